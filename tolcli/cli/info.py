"""``tolcli info``."""

from __future__ import annotations

from rich.table import Table

import tolcli
from tolcli.cli._common import (
    CheckpointArg,
    JsonOpt,
    Output,
    RevisionOpt,
    TensorMapOpt,
    checkpoint_from_cli,
    fmt_bytes,
    fmt_count,
)


def info(
    checkpoint: CheckpointArg,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Describe a checkpoint: architecture, parameters (total and active) and ToL table sizes.

    Example:

        tolcli info demo

        tolcli info ./my-memoryllm --json | jq .tol.bytes_total.fp16

        tolcli info org/my-memoryllm --revision v2   # from the local Hugging Face cache
    """
    out = Output(json=json_out, command="info", inputs=[checkpoint])
    with checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision) as ckpt:
        doc = tolcli.describe_checkpoint(ckpt)
    if json_out:
        out.emit_doc(doc)
        return
    cfg, params, tol = doc["config"], doc["parameters"], doc["tol"]
    arch = Table(title=f"{doc['checkpoint']} ({doc['model_type']})", show_header=False, title_justify="left")
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "vocab_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "memory_norm_type",
        "ffn_alpha",
        "context_intermediate_size",
    ):
        if key in cfg:
            arch.add_row(key, str(cfg[key]))
    arch.add_row("stored dtypes", ", ".join(doc["storage"]["dtypes"]))
    out.print(arch)
    pt = Table("parameters", "count", title="Parameters", title_justify="left")
    for key in ("embedding", "attention", "memory_ffn", "context_ffn", "head", "total", "active"):
        pt.add_row(key, f"{params[key]:,} ({fmt_count(params[key])})")
    out.print(pt)
    if tol["layers"]:
        tt = Table(
            "storage",
            "per layer",
            f"total ({tol['layers']} layers)",
            title=f"ToL tables: {tol['rows']:,} x {tol['width']} per layer",
            title_justify="left",
        )
        for key, per_layer in tol["bytes_per_layer"].items():
            tt.add_row(key, fmt_bytes(per_layer), fmt_bytes(tol["bytes_total"][key]))
        out.print(tt)
    else:
        out.print("No context-free FFN: this model has no ToLs.")
