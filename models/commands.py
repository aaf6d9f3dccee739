"""Click commands ``mqc export`` and ``mqc eval`` (registered on the main CLI with ``cli.add_command``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output model directory (default: the cache, $MQC_CACHE or ~/.cache/mqc/<name>).")
@click.option("--force", is_flag=True, help="Re-export even when the output already holds a model.")
def export_cmd(source: str, out_dir: Path | None, force: bool) -> None:
    """Export SOURCE (a packaged model name such as tiny-vlm, or a local Hugging Face checkpoint folder) into the
    component graphs mqc compiles: vision.onnx, embed.onnx, decoder.onnx, tokenizer.json and manifest.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mqc.models import manifest as mf
    from mqc.models.packaged import PACKAGED, export_packaged, resolve
    from rich.console import Console

    console = Console(stderr=True)

    def say(msg: str) -> None:
        console.print(f"[dim]mqc export:[/dim] {msg}")

    if source in PACKAGED:
        if out_dir is not None and (force or not mf.is_model_dir(out_dir)):
            export_packaged(source, out_dir, say)
            path = out_dir
        else:
            if force:
                import shutil

                from mqc.models.cache import cache_root

                shutil.rmtree(cache_root() / source, ignore_errors=True)
            path = resolve(source, out_dir, progress=True)
    else:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise click.BadParameter(f"{source!r} is neither a packaged model ({', '.join(PACKAGED)}) nor a folder")
        if mf.is_model_dir(src):
            path = src
        else:
            from mqc.models.cache import cache_root
            from mqc.models.export import export_checkpoint

            path = out_dir or cache_root() / src.name
            if force or not mf.is_model_dir(path):
                export_checkpoint(src, path, progress=say)
    man = mf.load(path)
    console.print(f"[green]model directory:[/green] {path}  ({man['family']}, components: "
                  f"{', '.join(man['components'])})")
    click.echo(str(path))


@click.command("eval")
@click.argument("float_dir")
@click.argument("compiled", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="test: the 1,000 reported questions and perplexity text; val: validation questions and text, for "
                   "choosing settings.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start at this question of the split.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate N questions (from --offset).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=Path("mqc-eval.json"),
              show_default=True, help="Where to write the result JSON.")
@click.option("--provider", "providers", multiple=True,
              help="onnxruntime execution provider(s), e.g. CPUExecutionProvider (default: CUDA if available).")
@click.option("--ppl-tokens", type=int, default=4096, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
def eval_cmd(float_dir: str, compiled: tuple[Path, ...], split: str, offset: int, limit: int | None, json_out: Path,
             providers: tuple[str, ...], ppl_tokens: int, batch_size: int, threads: int | None) -> None:
    """Evaluate FLOAT_DIR (a model directory or packaged name) and COMPILED directories: easy-vqa accuracy,
    perplexity, top-1 agreement and KL against the float model, size on disk, prefill and decode latency."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mqc.models.data import vqa_eval_set
    from mqc.models.evaluate import evaluate, format_table
    from mqc.models.packaged import resolve
    from rich.console import Console

    if offset >= len(vqa_eval_set(split)):
        raise click.BadParameter(f"the {split} split has {len(vqa_eval_set(split))} questions", param_hint="--offset")
    float_path = resolve(float_dir, progress=True)
    result = evaluate(float_path, list(compiled), limit=limit, providers=list(providers) or None,
                      json_out=json_out, progress=True, batch_size=batch_size, ppl_tokens=ppl_tokens,
                      threads=threads, split=split, offset=offset)
    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(format_table(result))
    console.print(f"[dim]wrote {json_out}[/dim]")


# The names mqc/cli.py registers (``main.add_command(commands.export_command, "export")``).
export_command = export_cmd
eval_command = eval_cmd

__all__ = ["eval_cmd", "eval_command", "export_cmd", "export_command"]
