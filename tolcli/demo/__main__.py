"""``python -m tolcli.demo``: print the demo models' figures (the README quotes them)."""

from tolcli.demo.figures import DEMO_CTX, DEMO_STRIDE, demo_figures

figures = demo_figures()
print(f"held-out tokens: {figures['heldout_tokens']} (ctx {DEMO_CTX}, stride {DEMO_STRIDE})")
for key, value in figures.items():
    if key != "heldout_tokens":
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value:,}")
zeroed = figures["memoryllm_ppl_memory_zeroed"] / figures["memoryllm_ppl"] - 1
print(f"zeroing the FFN memory raises memoryllm perplexity by {100 * zeroed:,.0f}%")
