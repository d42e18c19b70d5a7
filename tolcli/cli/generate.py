"""``tolcli generate``: text from a checkpoint (its own FFNs) or a stripped checkpoint plus a ToL bundle."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tolcli._lazy import lazy_import
from tolcli.cli._common import (
    AllowSourceMismatchOpt,
    CheckpointArg,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    Output,
    QuietOpt,
    RevisionOpt,
    TensorMapOpt,
    ThreadsOpt,
    apply_threads,
    checkpoint_from_cli,
    note_to_stderr,
)

gen = lazy_import("tolcli.generate")  # torch: not for --help
hf = lazy_import("tolcli.hf")


def generate_cmd(
    checkpoint: CheckpointArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    tol: Annotated[
        Path | None, typer.Option("--tol", help="Run the context-free FFNs from this ToL bundle (mmap'd).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; else sample.")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample among the K most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: smallest set with mass P.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler (reproducible runs).")] = 0,
    cache_tokens: Annotated[
        int, typer.Option("--cache-tokens", metavar="K", help="With --tol: keep K hot tokens' rows resident.")
    ] = 0,
    device: DeviceOpt = "auto",
    allow_source_mismatch: AllowSourceMismatchOpt = False,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate text with a KV cache: greedy by default, or sampled (temperature, top-k, top-p, seed).

    The text streams to the terminal as it is produced; --json prints the text, the token ids and timings.

    Example:

        tolcli generate demo --prompt "def " --max-new-tokens 32

        tolcli generate ./stripped --tol int4.safetensors --prompt "The " --temperature 0.8 --top-p 0.9 --seed 1
    """
    apply_threads(threads)
    out = Output(json=json_out, quiet=quiet, command="generate", inputs=[checkpoint, tol])
    options = gen.SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)
    shown = [0]
    if not (out.json or out.quiet):
        sys.stdout.write(prompt)

    def stream(text: str) -> None:
        if out.json or out.quiet:
            return
        sys.stdout.write(text[shown[0] :])
        sys.stdout.flush()
        shown[0] = len(text)

    res = gen.generate_text(
        checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision),
        prompt,
        tol=tol,
        options=options,
        device=device,
        cache_tokens=cache_tokens,
        allow_source_mismatch=allow_source_mismatch,
        on_text=stream,
        note=note_to_stderr(out),
    )
    if json_out:
        out.emit_doc({"prompt": prompt, **res.to_json()})
        return
    if not quiet:
        sys.stdout.write(res.text[shown[0] :] + "\n")
        g = res.generation
        sys.stderr.write(
            f"tolcli: {len(g.new_ids)} tokens ({g.stopped}), prefill {1000 * g.prefill_seconds:.1f} ms, "
            f"{g.ms_per_token:.2f} ms/token\n"
        )


def export_hf_cmd(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="The directory to write.")],
    tol: Annotated[
        Path | None, typer.Option("--tol", help="The bundle a stripped checkpoint runs from (recorded as a path).")
    ] = None,
    tensor_map: TensorMapOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a checkpoint directory that transformers loads: AutoModelForCausalLM.from_pretrained(DIR,
    trust_remote_code=True) (needs tolcli and transformers installed where it runs).

    Example:

        tolcli export-hf demo -o demo-hf

        tolcli export-hf ./stripped --tol int4.safetensors -o deploy-hf
    """
    out = Output(json=json_out, quiet=quiet, command="export-hf", inputs=[checkpoint, tol], output=output)
    path = hf.export_hf(
        checkpoint_from_cli(checkpoint, tensor_map=tensor_map, revision=revision), output, tol=tol, force=force
    )
    if json_out:
        out.emit_doc({"tol": None if tol is None else str(tol)}, output=path)
    else:
        out.print(f"wrote {path} (load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
