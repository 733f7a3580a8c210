"""Chapter 06 (Mixture-of-Experts) against an independent reference: transformers' Mixtral MoE block.

The chapter's MoE layer is loaded from the notebook's `model` cells. Its parameter names and layouts are
those of `transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock` (5.x: router `gate.weight`
(E, C), fused experts `gate_up_proj` (E, 2I, C) and `down_proj` (E, C, I)), so one state dict loads into both.
Outputs, router logits and gradients must agree in float32; the load-balancing loss must equal
`load_balancing_loss_func` (transformers' top-k convention: 2.0 for a uniform router at top-2). Internal
equivalences: dropless dispatch = capacity dispatch without drops = the dense every-expert reference;
the GPT with E = 1 is a dense SwiGLU model; each exercise check rejects a plausible wrong answer; the
capacity explorer drops fewer assignments as the capacity factor grows, none at E/k.
"""

from functools import partial

import pytest
import torch

from labkit import notebook

from .conftest import ROOT
from .grads import report
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "06_moe.ipynb"
mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


_report = partial(report, atol=ATOL, rtol=RTOL)   # print the max error, assert closeness


def _pair(ns, C=32, I=48, E=8, k=2, seed=0, capacity_factor=None):
    """Our MoE layer and transformers' MixtralSparseMoeBlock with the same random weights."""
    from transformers import MixtralConfig

    hf_cfg = MixtralConfig(hidden_size=C, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                           router_jitter_noise=0.0, hidden_act="silu")
    ours = ns["MoE"](ns["MoEConfig"](block_size=16, vocab_size=10, n_layer=1, n_head=4, n_embd=C, n_expert=E,
                                      top_k=k, expert_hidden=I, capacity_factor=capacity_factor))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.gate.weight.copy_(torch.randn(E, C, generator=g))                # large logits: real choices
        ours.experts.gate_up_proj.copy_(0.2 * torch.randn(E, 2 * I, C, generator=g))
        ours.experts.down_proj.copy_(0.2 * torch.randn(E, C, I, generator=g))
    ref = mixtral.MixtralSparseMoeBlock(hf_cfg)
    missing = ref.load_state_dict(ours.state_dict(), strict=True)         # same names, same layouts
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, ref


@pytest.mark.parametrize("E,k", [(8, 2), (4, 1), (6, 3)])
def test_moe_layer_matches_mixtral_outputs_logits_and_grads(ns, E, k):
    ours, ref = _pair(ns, E=E, k=k, seed=E + k)
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    captured = {}
    ref.gate.register_forward_hook(lambda m, i, out: captured.update(logits=out[0]))   # returns None
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    print(f"\nE={E}, k={k}: experts used {torch.bincount(ours.chosen.flatten(), minlength=E).tolist()}")
    _report("output", y_ours, y_ref)
    _report("router logits", ours.router_logits, captured["logits"])

    g_out = torch.randn_like(y_ref)
    (y_ours * g_out).sum().backward()
    (y_ref * g_out).sum().backward()
    _report("grad input", x_ours.grad, x_ref.grad)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        _report(f"grad {name}", p.grad, ref_params[name].grad)
    if k == 1:   # renormalising one weight gives exactly 1: the router gets no gradient from the output
        assert ours.gate.weight.grad.abs().max().item() < 1e-5


def test_capacity_dispatch_without_drops_matches_mixtral(ns):
    E, k = 8, 2
    ours, ref = _pair(ns, E=E, k=k, seed=5, capacity_factor=E / k)      # E/k: room for every token everywhere
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    print()
    _report("capacity output", y_ours, y_ref)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    _report("capacity grad input", x_ours.grad, x_ref.grad)
    _report("capacity grad down_proj", ours.experts.down_proj.grad, ref.experts.down_proj.grad)


def test_load_balancing_loss_matches_transformers(ns):
    lb = ns["load_balancing_loss"]
    g = torch.Generator().manual_seed(0)
    print()
    for E, k in [(8, 2), (8, 1), (16, 4)]:
        logits = 2 * torch.randn(200, E, generator=g)
        ours, theirs = lb(logits, k), mixtral.load_balancing_loss_func((logits,), E, k)
        print(f"  E={E:2d} k={k}: ours {ours.item():.6f}, transformers {theirs.item():.6f}, "
              f"error {abs(ours.item() - theirs.item()):.1e}")
        assert abs(ours.item() - theirs.item()) < 1e-6
        # the gradient too (transformers' flows through the mean probabilities only, as ours)
        la, lb_ = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        lb(la, k).backward()
        mixtral.load_balancing_loss_func((lb_,), E, k).backward()
        _report(f"grad E={E} k={k}", la.grad, lb_.grad, atol=1e-7)
    # the convention: a uniform router gives k in transformers' (and our) convention, 1 in Switch's
    uniform = torch.zeros(64, 8)
    for k in (1, 2, 4):
        assert lb(uniform, k).item() == pytest.approx(k)
        assert mixtral.load_balancing_loss_func((uniform,), 8, k).item() == pytest.approx(k)
    print("  uniform router: 1.0 at top-1, 2.0 at top-2, 4.0 at top-4 (Switch's normalisation by N·k: 1.0)")
    # several layers: transformers pools all layers' counts before multiplying; we average per-layer losses
    layers = tuple(2 * torch.randn(100, 8, generator=g) for _ in range(3))
    pooled = mixtral.load_balancing_loss_func(layers, 8, 2).item()
    per_layer = torch.stack([lb(h, 2) for h in layers]).mean().item()
    print(f"  3 layers: transformers (pooled) {pooled:.4f}, ours (mean of layers) {per_layer:.4f}")


def test_dispatch_paths_equal_dense_reference(ns):
    g = torch.Generator().manual_seed(3)
    N, C, I, E = 50, 12, 20, 6
    experts = ns["Experts"](E, C, I)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(N, C, generator=g)
    print()
    for k in (1, 2, 3):
        w, e = ns["top_k_route"](torch.randn(N, E, generator=g), k)
        dense = ns["moe_dense_reference"](x, w, e, experts.gate_up_proj, experts.down_proj)
        _report(f"dropless k={k}", ns["moe_dispatch"](x, w, e, experts, E), dense)
        _report(f"capacity N k={k}", ns["moe_dispatch_capacity"](x, w, e, experts.gate_up_proj,
                                                                 experts.down_proj, N), dense)


def test_capacity_drops_follow_the_queue(ns):
    """Capacity c drops exactly the assignments at queue positions >= c; first choices queue first."""
    qp = ns["queue_positions"]
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    pos = qp(experts, 3)
    # expert 0's queue: first choices of tokens 0, 1, 2, then token 3's second choice
    assert pos[:, 0].tolist() == [0, 1, 2, 0] and pos[3, 1].item() == 3
    assert pos[0, 1].item() == 1 and pos[2, 1].item() == 2          # expert 1: token 3 first (a first choice)
    # dropped assignments contribute nothing; kept ones exactly what the dropless layer gives
    g = torch.Generator().manual_seed(4)
    ex = ns["Experts"](3, 8, 8)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(4, 8, generator=g)
    w = torch.full((4, 2), 0.5)
    y = ns["moe_dispatch_capacity"](x, w, experts, ex.gate_up_proj, ex.down_proj, 2)
    kept = (pos < 2).float()
    want = ns["moe_dense_reference"](x, w * kept, experts, ex.gate_up_proj, ex.down_proj)
    _report("capacity 2 with drops", y, want)
    assert ns["expert_capacity"](4096, 8, 2, 1.25) == 1280


def test_dense_twin_is_a_dense_swiglu_gpt(ns):
    """E = 1, k = 1: the routing weight is exactly 1 and the layer is a plain SwiGLU MLP."""
    cfg = ns["MoEConfig"].preset("tiny", vocab_size=50, n_layer=2)
    dense = cfg.dense_twin()
    assert (dense.n_expert, dense.top_k, dense.expert_hidden) == (1, 1, 2 * cfg.expert_hidden)
    torch.manual_seed(0)
    m = ns["MoEGPT"](dense)
    layer = m.moe_layers()[0]
    x = torch.randn(2, 8, cfg.n_embd)
    y = layer(x)
    want = ns["swiglu"](x, layer.experts.gate_up_proj[0], layer.experts.down_proj[0])
    _report("dense twin = SwiGLU", y, want)
    # same active parameters as the MoE, fewer in total
    with torch.device("meta"):
        moe, twin = ns["MoEGPT"](cfg), ns["MoEGPT"](dense)
    assert moe.num_active_params() == twin.num_active_params() + cfg.n_layer * cfg.n_embd * (cfg.n_expert - 1)
    assert moe.num_params(non_embedding=False) > 2 * twin.num_params(non_embedding=False)


def test_gpt_losses_backward_and_full_size_counts(ns):
    cfg = ns["MoEConfig"].preset("tiny", vocab_size=40, n_layer=2)
    torch.manual_seed(0)
    m = ns["MoEGPT"](cfg)
    idx = torch.randint(40, (2, 64))
    logits, loss = m(idx, idx.roll(-1, 1))
    parts = m.losses
    total = parts["ce"] + cfg.balance_coef * parts["balance"] + cfg.z_coef * parts["z"]
    assert logits.shape == (2, 64, 40) and loss.item() == pytest.approx(total.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters()), "every parameter (router included) gets a gradient"
    # the routers learn from the balance loss alone when the CE does not reach them
    m.zero_grad()
    m(idx, idx.roll(-1, 1))
    ns["load_balancing_loss"](m.moe_layers()[0].router_logits, cfg.top_k).backward()
    assert m.moe_layers()[0].gate.weight.grad.abs().sum() > 0
    # full size: GPT-2's attention with 8 SwiGLU experts top-2, active = GPT-2 124M's parameter count +
    # the routers, minus the MLP biases
    with torch.device("meta"):
        full = ns["MoEGPT"](ns["MoEConfig"].preset("gpt2-8x2"))
        gpt2 = ns["GPT"](ns["GPTConfig"].preset("gpt2", vocab_size=50304))
    C, L = 768, 12
    assert full.num_active_params() == gpt2.num_params(non_embedding=False) - L * 5 * C + L * C * 8
    print(f"\nfull MoE: {full.num_params(non_embedding=False) / 1e6:.1f}M total, "
          f"{full.num_active_params() / 1e6:.1f}M active (GPT-2: {gpt2.num_params(non_embedding=False) / 1e6:.1f}M)")
    with pytest.raises(ValueError, match="top_k"):
        ns["MoEConfig"](n_expert=4, top_k=5)


def test_router_runs_in_float32_under_autocast(ns):
    ours, _ = _pair(ns)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert ours.router_logits.dtype == torch.float32 and y.dtype == torch.bfloat16
    with torch.no_grad():
        err = (y.float() - ours(x)).abs().max().item()
    print(f"\nbf16 autocast vs fp32 output: max error {err:.2e}")
    assert err < 0.05


WRONG_ANSWERS = {
    # the softmax over the tokens instead of over the experts: each expert's scores sum to 1 over the batch
    0: """
def expert_choice(logits, capacity):
    scores = logits.float().softmax(dim=0)
    weights, tokens = scores.t().topk(capacity, dim=-1)
    return weights, tokens
""",
    # queues by priority, but ascending: the least confident tokens are served first
    1: """
def priority_kept(experts, priority, n_expert, capacity):
    order = priority.argsort(stable=True)
    position = torch.empty_like(experts)
    position[order] = queue_positions(experts[order], n_expert)
    return position < capacity
""",
    # the bias leaks into the weights: the experts are mixed by p + b instead of p
    2: """
def biased_route(logits, bias, k):
    scores = logits.float().softmax(dim=-1) + bias
    weights, experts = scores.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def update_bias(bias, experts, n_expert, rate):
    load = torch.bincount(experts.flatten(), minlength=n_expert).to(bias.dtype)
    return bias + rate * torch.sign(experts.numel() / n_expert - load)
""",
}

# a correct route with the update's sign flipped: the busy experts get busier (the 300-step loop catches it)
SIGN_FLIPPED = """
def biased_route(logits, bias, k):
    probs = logits.float().softmax(dim=-1)
    experts = (probs + bias).topk(k, dim=-1).indices
    weights = probs.gather(-1, experts)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def update_bias(bias, experts, n_expert, rate):
    load = torch.bincount(experts.flatten(), minlength=n_expert).to(bias.dtype)
    return bias - rate * torch.sign(experts.numel() / n_expert - load)
"""

# token-order queues (the chapter's own queue_positions): right count of drops, wrong tokens dropped
TOKEN_ORDER = """
def priority_kept(experts, priority, n_expert, capacity):
    return queue_positions(experts, n_expert) < capacity
"""


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


@pytest.mark.parametrize("index,source", [(2, SIGN_FLIPPED), (1, TOKEN_ORDER)], ids=["sign-flipped", "token-order"])
def test_more_wrong_answers_are_rejected(index, source):
    from labkit.check import ExerciseError

    with pytest.raises(ExerciseError):
        notebook.run_exercise(NB, index, source)


def test_capacity_explorer_drops_fewer_with_more_capacity():
    import matplotlib.figure

    ex = notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    config = ex["MoEConfig"].preset("tiny")
    model = ex["MoEGPT"](config)                                       # untrained: a near-uniform random router
    idx = torch.randint(config.vocab_size, (8, config.block_size), generator=torch.Generator().manual_seed(1))
    view = ex["explore_capacity"]({"untrained": model}, idx)
    tight, loose = view.set(capacity_factor=0.75)["dropped"], view.set(capacity_factor=1.5)["dropped"]
    print(f"\ndropped at c = 0.75: {tight:.3f}; at c = 1.5: {loose:.3f}")
    assert tight > loose and tight > 0.2                               # c < 1 always drops at least 1 - c
    assert view.set(capacity_factor=config.n_expert / config.top_k)["dropped"] == 0   # E/k: room for everyone
    r = view.set(capacity_factor=1.0, layer=0)
    assert sum(r["kept"]) + round(r["dropped"] * sum(r["load"])) == sum(r["load"]) == idx.numel() * config.top_k
    assert max(r["kept"]) <= r["capacity"]
    assert isinstance(view.figure(), matplotlib.figure.Figure)
