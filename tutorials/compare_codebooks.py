"""Tutorial: see the learned codebooks. For a few rows of one weight matrix, plot each format's
16 LUT entries over the histogram of that row's weights, each in the format's own code domain
((w - zero) / scale per group): int4 is a fixed even grid, nf4/fp4 fixed non-uniform grids, and
any4 a per-row LUT that k-means placed where the weights (and, with calibration, the important
channels) are.

    python tutorials/compare_codebooks.py                    # SmolLM2-135M, layer 0 mlp.down_proj
    python tutorials/compare_codebooks.py --tiny             # a tiny random Llama (what CI runs)
    python tutorials/compare_codebooks.py --layer 12 --proj self_attn.o_proj --rows 0,7,100
Writes codebooks.png (one row of panels per weight row, one column per format).
"""

import argparse

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import any4ao  # noqa: E402
from any4ao import Any4Tensor  # noqa: E402
from any4ao.codebooks.group_scaling import to_code_domain  # noqa: E402

FORMATS = ("int4", "nf4", "fp4", "any4")


def load(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = LlamaForCausalLM(cfg).eval()
        return model, any4ao.calibrate(model, input_ids=torch.randint(0, 256, (1, 64)))
    from any4ao.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(dtype=torch.float32)
    return model, any4ao.calibrate(model, tokenizer)


def quantize_row_formats(linear, stats, group_size):
    """{format: Any4Tensor} for one nn.Linear; the module itself is left unquantized."""
    w = linear.weight.detach().float()
    importance = stats.for_module(linear) if stats is not None else None
    out = {}
    for name in FORMATS:
        config = any4ao.Any4WeightOnlyConfig(codebook=name, group_size=group_size)
        out[name] = Any4Tensor.from_hp(w, config, channel_weight=importance if config.codebook.learned else None)
    return w, out


def plot(w, formats, rows, group_size, path):
    fig, axes = plt.subplots(len(rows), len(formats), figsize=(4 * len(formats), 2.6 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, (name, q) in enumerate(formats.items()):
            ax = axes[i][j]
            x = to_code_domain(w[r : r + 1], q.scale[r : r + 1].float(), q.zero_point[r : r + 1].float(), group_size)[0]
            err = (q.dequantize().float()[r] - w[r]).square().mean().sqrt() / w[r].square().mean().sqrt()
            ax.hist(x.numpy(), bins=80, color="0.6")
            for v in q.lut[r].float().tolist():
                ax.axvline(v, color="tab:red" if name == "any4" else "tab:blue", lw=0.9)
            ax.set_title(f"{name}, row {r}: rel. RMS error {err:.3f}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle("weights of each row in the format's code domain (grey) and its 16 LUT entries (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--proj", default="mlp.down_proj", help="linear inside the decoder layer")
    p.add_argument("--rows", default="0,1,2", help="comma-separated weight rows to plot")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--no-calibration", action="store_true", help="unweighted k-means for any4")
    p.add_argument("--out", default="codebooks.png")
    args = p.parse_args(argv)

    model, stats = load(args.tiny)
    linear = model.model.layers[args.layer].get_submodule(args.proj)
    w, formats = quantize_row_formats(linear, None if args.no_calibration else stats, args.group_size)
    rows = [int(r) for r in args.rows.split(",")]
    plot(w, formats, rows, args.group_size, args.out)
    for name, q in formats.items():  # whole-matrix error, the number the plot illustrates
        rel = (q.dequantize().float() - w).norm() / w.norm()
        print(f"{name:5s} relative Frobenius error {rel:.4f}")
    print(f"wrote {args.out}")
    return formats


if __name__ == "__main__":
    main()
