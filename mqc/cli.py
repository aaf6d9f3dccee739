"""The ``mqc`` command line: compile, explain, diagnose, recipes, export, eval and demo."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mqc.errors import InputModelError, InternalError, MqcError, printable
from mqc.recipes import MIN_TEXT_WINDOW

console = Console(stderr=True, soft_wrap=True)  # one message, one line, also in logs and pipes

#: Exit code of a failure that is mqc's own fault (a bug), as opposed to bad input (2).
INTERNAL_ERROR = 1


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def shown(value: object) -> str:
    """``value`` (a path, a name from a file) placed inside rich markup: escaped, never interpreted."""
    return escape(printable(value))


def error_line(message: str) -> None:
    """One line on stderr, never wrapped (also when stderr is a file or a pipe), with control characters escaped."""
    line = printable(" ".join(message.split()))
    if console.is_terminal:
        console.print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True, highlight=False)
    else:
        click.echo(f"error: {line}", err=True)


class MqcGroup(click.Group):
    """Turns every :class:`MqcError` into one line on stderr and exit code 2, and any other failure into one line
    and exit code 1 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so staged outputs are removed by their `finally`.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except MqcError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error_line(str(exc))
            sys.exit(exc.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except InternalError as exc:  # a bug mqc found itself (a broken postcondition): its own message
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error_line(f"internal error: {exc}; nothing was written (rerun with --debug for the traceback and "
                       "report it)")
            sys.exit(INTERNAL_ERROR)
        except OSError as exc:  # a path the user named cannot be used (permissions, name too long, I/O error)
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            error_line(f"{exc.strerror or exc}{where}")
            sys.exit(2)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            detail = str(exc).strip().splitlines()
            error_line(f"internal error ({type(exc).__name__}: {detail[0][:300] if detail else ''}); "
                       "rerun with --debug for the traceback and report it")
            sys.exit(INTERNAL_ERROR)


class InertTextColumn(TextColumn):
    """A task description (it can hold a recipe name from a file) shown as plain text, control characters escaped."""

    def render(self, task) -> Text:
        return Text(printable(task.description))


def progress_bar() -> Progress:
    return Progress(SpinnerColumn(), InertTextColumn(""), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


@click.group(cls=MqcGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """mqc: a compiler that statically quantizes multimodal LLM ONNX graphs for onnxruntime."""
    ctx.obj = {"debug": debug}


@main.command("compile")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Compiled .onnx file or directory.")
@click.option("--recipe", default="w8a8", show_default=True,
              help="Recipe name (see `mqc recipes`) or a recipe .json file, optionally NAME:PASS.KEY=VALUE[:...].")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration samples: an .npz or a folder of .npz (single-file input).")
@click.option("--samples", type=click.IntRange(min=1),
              help="Calibration samples to use (default: the number the recipe was chosen with, else 32).")
@click.option("--text-window", type=click.IntRange(min=MIN_TEXT_WINDOW),
              help="Tokens per text-only calibration sample of a packaged model's decoder (default: the recipe's "
                   "text_window, else 96).")
@click.option("--format", "fmt", type=click.Choice(["qdq", "mqc"]), default="qdq", show_default=True,
              help="qdq: standard ONNX ops; mqc: the project's runtime-ops library.")
@click.option("--exclude", multiple=True, help="Regex of layer names to keep in float (repeatable).")
@click.option("--verify", is_flag=True, help="Check every function-preserving pass numerically in onnxruntime.")
@click.option("--verify-rtol", default=1e-4, show_default=True, help="Allowed relative output drift under --verify.")
@click.option("--bits", type=click.Choice(["w4a8", "w8a8", "w8a8-vision"]),
              help="Override the recipe's bit widths: both towers W4A8 or W8A8, or W8A8 vision with a W4A8 LLM.")
@click.option("--acts", type=click.Choice(["dynamic", "static"]),
              help="Activation scales of recipes that offer the choice (masquant): per-token dynamic or static per modality.")
@click.option("--set", "assignments", multiple=True, metavar="PASS.KEY=VALUE",
              help="Override a recipe parameter (repeatable; VALUE is JSON or a plain string), e.g. "
                   "hadamard_rotation.head_dim=64. Checked like the recipe file, before any work.")
@click.option("--allow-partial", is_flag=True,
              help="Write the model even when a pass cannot do its essential work (e.g. a refused rotation); the "
                   "summary's first line says what did not apply. Without it such a compile exits 2.")
@click.option("--min-sqnr", type=float, help="Quality gate: exit 3 (output kept as *.rejected) when the compiled "
              "model's logits (or first output) SQNR vs float on held-out samples is below this, in dB.")
@click.option("--max-kl", type=float, help="Quality gate: exit 3 (output kept as *.rejected) when the mean per-token "
              "KL(float || compiled) of the logits on held-out samples exceeds this.")
@click.option("--ray", "ray_address", envvar="MQC_RAY_ADDRESS", metavar="ADDRESS",
              help="Spread calibration and GPTQ over a Ray cluster (ray://HOST:10001, HOST:6379, auto), or `local` to "
                   "start one here; the output is the same, bit for bit. Default: $MQC_RAY_ADDRESS, else one process.")
@click.option("--ray-workers", type=click.IntRange(min=1),
              help="With --ray: calibration shards at most (default: the cluster's CPUs); the size of a `local` cluster.")
@click.option("--stream/--no-stream", default=None,
              help="Compile layer by layer with bounded memory (default: on above 4 GB of weights when the recipe "
                   "can stream); a recipe that cannot stream is refused under --stream.")
@click.option("--stream-inputs", type=click.Choice(["float", "quantized"]), default="float", show_default=True,
              help="What block i+1 calibrates on under --stream: the float model's activations (the whole-model "
                   "result, byte for byte) or the quantized blocks' outputs (sequential).")
def compile_command(model: str, output: Path, recipe: str, calib: Path | None, samples: int | None, fmt: str,
                    exclude: tuple[str, ...], verify: bool, verify_rtol: float, bits: str | None,
                    acts: str | None, assignments: tuple[str, ...], allow_partial: bool,
                    min_sqnr: float | None, max_kl: float | None, ray_address: str | None,
                    ray_workers: int | None, stream: bool | None, stream_inputs: str, text_window: int | None) -> None:
    """Compile MODEL (an .onnx file, a model directory or a packaged model name) into OUTPUT."""
    from mqc.compiler import compile as compile_model
    from mqc.distributed import executor_for
    from mqc.quality_gate import Limits
    from mqc.recipes import load_recipe, with_acts, with_assignments, with_bits

    chosen = load_recipe(recipe)
    if bits:
        chosen = with_bits(chosen, bits)
    if acts:
        chosen = with_acts(chosen, acts)
    if assignments:
        chosen = with_assignments(chosen, list(assignments))
    if text_window is not None:
        if Path(model).suffix == ".onnx":
            raise InputModelError("--text-window sets the text samples a model folder's package builds; an .onnx "
                                  "file calibrates on --calib")
        chosen = dataclasses.replace(chosen, text_window=text_window)
    with executor_for(ray_address, ray_workers) as executor, progress_bar() as progress:
        result = compile_model(model, output, chosen, calib=calib, num_samples=samples, fmt=fmt, exclude=exclude,
                               verify=verify, verify_rtol=verify_rtol, progress=progress, allow_partial=allow_partial,
                               limits=Limits(min_sqnr, max_kl), executor=executor,
                               **({"stream": stream, "stream_inputs": stream_inputs}
                                  if stream is not None or stream_inputs != "float" else {}))
    reports = result if isinstance(result, dict) else {Path(model).name: result}
    partial = [f"{name}: {what}" for name, report in reports.items() for what in report.not_applied()]
    if partial:
        console.print(f"[bold yellow]partial (--allow-partial): did not apply:[/bold yellow] {'; '.join(partial)}",
                      highlight=False, soft_wrap=True)  # one line, however long
    for name, report in reports.items():
        _summary(name, report)
    console.print(f"[green]wrote[/green] {shown(output)}")


def _summary(name: str, report) -> None:
    rows = [r for r in report.layer_table() if "w_bits" in r]  # rotation/smoothing rows are not quantized layers
    sqnr = [r["sqnr_db"] for r in rows if isinstance(r.get("sqnr_db"), float)]
    skipped = sum(len(p.skipped) for p in report.passes)
    verified = [p for p in report.passes if p.verify is not None]
    line = (f"[bold]{shown(name)}[/bold]: {shown(report.recipe)} ({report.format}) in {report.seconds:.1f}s, "
            f"{len(rows)} layers quantized, {skipped} skipped")
    if sqnr:
        line += f", output SQNR median {sorted(sqnr)[len(sqnr) // 2]:.1f} dB (min {min(sqnr):.1f})"
    if verified:
        worst = max(p.verify["max_rel"] for p in verified)
        line += f", {len(verified)} passes verified (max drift {worst:.1e})"
    nested = report.model_summary.get("left_float_in_subgraphs")
    if nested:
        line += f", {len(nested)} MatMul/Gemm inside If/Loop bodies left in float"
    console.print(line)
    if "half_precision" in report.model_summary:
        console.print(report.model_summary["half_precision"], highlight=False)
    if report.quality:
        from mqc.quality_gate import summary_line

        console.print(summary_line(report.quality), highlight=False)


@main.command()
@click.argument("target", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--recipe", help="Dry run: apply this recipe to a float model in memory and explain it.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration samples for a dry run.")
def explain(target: str, as_json: bool, recipe: str | None, calib: Path | None) -> None:
    """Explain what each pass did to TARGET (a compiled .onnx or compiled model directory)."""
    from mqc.compiler import compile_file
    from mqc.explain import render, to_json
    from mqc.ir import load_model
    from mqc.packages import component_paths, is_model_dir, read_manifest

    path = Path(target)
    reports = {}
    if recipe is not None:
        with progress_bar() as progress:
            reports[path.name] = compile_file(path, path.with_suffix(".dry-run.onnx"), recipe, calib=calib,
                                              progress=progress, write=False)
    else:
        files = [path]
        if is_model_dir(path):
            files = list(component_paths(path, read_manifest(path)).values())
        for file in files:
            load_model(file)  # one clear error for a missing or broken file, and the external-data checks
            report = _stored_report(file)
            if report is not None:
                reports[file.name] = report
        if not reports:
            raise InputModelError(f"{target} was not compiled by mqc (no report in its metadata); "
                                  "use --recipe NAME for a dry run on a float model")
    if as_json:
        click.echo(to_json(reports))
        return
    out = Console(width=None if sys.stdout.isatty() else 200)
    for name, report in reports.items():
        try:
            render(report, out, title=name)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InputModelError(f"the mqc report stored in {name} is damaged ({type(exc).__name__})") from exc


def _stored_report(file: Path):
    from mqc.report import read_report

    try:
        return read_report(str(file))
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise InputModelError(f"the mqc report stored in {file} is damaged ({type(exc).__name__})") from exc


@main.command()
@click.argument("float_model")
@click.argument("compiled", type=click.Path(exists=True, path_type=Path))
@click.option("--samples", default=8, show_default=True, help="Validation samples (model folders) or inputs to run.")
@click.option("--offset", default=0, show_default=True, help="First validation question to use (model folders).")
@click.option("--calib", type=click.Path(exists=True, path_type=Path),
              help="Inputs for single .onnx files: an .npz or a folder of them (default: synthetic inputs).")
@click.option("--top", default=3, show_default=True, help="Largest tokens to list per layer and modality.")
@click.option("--component", "components", multiple=True, help="Only this component of a model folder (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON instead of tables.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Also write the JSON to this file.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Also draw SQNR by layer, static vs dynamic scales, as an SVG chart in this file.")
def diagnose(float_model: str, compiled: Path, samples: int, offset: int, calib: Path | None, top: int,
             components: tuple[str, ...], as_json: bool, output: Path | None, plot: Path | None) -> None:
    """Per statically quantized layer of COMPILED and per modality: output SQNR with its static activation scale,
    the same with per-token dynamic scales (what-if), against FLOAT, and the tokens that set each range."""
    from mqc.diagnose import diagnose as run_diagnosis
    from mqc.diagnose import plot_panels, render
    from mqc.errors import OutputPathError
    from mqc.outputs import write_text_atomically
    from mqc.plot import render_svg

    if samples < 1 or offset < 0 or top < 1:
        raise InputModelError("--samples and --top must be at least 1, --offset at least 0")
    for path in (output, plot):
        if path is not None and not path.parent.is_dir():
            raise OutputPathError(f"output folder does not exist: {path.parent}")
    with progress_bar() as progress:
        def tick(component: str, total: int):
            task = progress.add_task(f"diagnosing {component}", total=total)
            return lambda: progress.advance(task)

        try:
            result = run_diagnosis(float_model, compiled, samples, offset, calib, top, tick, components)
        except ValueError as exc:  # a validation slice out of range
            raise InputModelError(str(exc)) from exc
    text = json.dumps(result, indent=2)
    if output is not None:
        write_text_atomically(output, text + "\n")
    if plot is not None:
        write_text_atomically(plot, render_svg(plot_panels(result)))
    if as_json:
        click.echo(text)
        return
    render(result, Console(width=None if sys.stdout.isatty() else 200))


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def recipes(name: str | None, as_json: bool) -> None:
    """List the built-in recipes and their passes; with NAME (a recipe, .json file or NAME:PASS.KEY=VALUE spec),
    print that recipe resolved (extends and overrides applied) as JSON."""
    from mqc.recipes import builtin_recipes, load_recipe

    if name is not None:
        click.echo(json.dumps(load_recipe(name).to_dict(), indent=2, ensure_ascii=False))
        return
    all_recipes = builtin_recipes()
    if as_json:
        click.echo(json.dumps({n: {"description": r.description, "passes": r.passes, "components": r.components}
                               for n, r in all_recipes.items()}, indent=2))
        return
    out = Console()
    for recipe in all_recipes.values():
        out.print(f"[bold cyan]{recipe.name}[/bold cyan]: {recipe.description}")
        for step in recipe.passes:
            params = ", ".join(f"{k}={v}" for k, v in step.items() if k != "pass")
            out.print(f"    {step['pass']}" + (f" ({params})" if params else ""))
        for component, entry in recipe.components.items():
            out.print(f"    [italic]{component}[/italic]: {json.dumps(entry)}")


#: The recipe `mqc demo` compiles the packaged model with: MQuant plus the sink scale class, chosen on validation
#: questions (BENCHMARKS.md: 90.0 % against mquant's 65.0 % on 200 validation questions, float 92.5 %).
DEMO_RECIPE = "mquant-sink"


@main.command()
@click.option("--model", default="tiny-vlm", show_default=True, help="Packaged model name or model directory.")
@click.option("--recipe", default=DEMO_RECIPE, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "mqc", "qdq"]), default="auto", show_default=True,
              help="mqc: the ai.mqc runtime ops (the deployable form); qdq: standard Q/DQ for stock onnxruntime; "
                   "auto: mqc when the runtime-ops library is built, else qdq.")
@click.option("--limit", default=100, show_default=True, help="easy-vqa test questions to evaluate (1000 = all).")
@click.option("--ppl-tokens", default=2048, show_default=True, help="Perplexity tokens (independent 512-token windows).")
@click.option("--samples", default=16, show_default=True, help="Calibration samples.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("out"), show_default=True)
def demo(model: str, recipe: str, fmt: str, limit: int, ppl_tokens: int, samples: int, workdir: Path) -> None:
    """The main job: export the packaged model (cached), compile it to its deployable form, evaluate float vs
    compiled (accuracy, perplexity, KL, latency side by side), print the table and the time of each stage."""
    import time

    from mqc.compiler import compile_package
    from mqc.models.evaluate import evaluate, format_table
    from mqc.models.packaged import resolve

    workdir.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, float]] = []
    fmt = _demo_format(fmt)
    start = time.perf_counter()
    console.print(f"[bold]1/3[/bold] float model: {shown(model)} (exported once, then cached)")
    float_dir = resolve(model, progress=True)
    stages.append(("export (or cache)", time.perf_counter() - start))
    compiled = workdir / f"{Path(model).name}.{recipe}.{fmt}"
    console.print(f"[bold]2/3[/bold] compiling with recipe {shown(recipe)}, format {fmt} -> {shown(compiled)}")
    with progress_bar() as progress:
        reports = compile_package(float_dir, compiled, recipe, num_samples=samples, fmt=fmt, progress=progress)
    for name, report in reports.items():
        _summary(name, report)
        stages.append((f"compile {name}", report.seconds))
    stages.append(("compile, all", time.perf_counter() - start - stages[0][1]))
    console.print(f"[bold]3/3[/bold] evaluating float vs {shown(recipe)} ({fmt}) on {limit} easy-vqa test questions "
                  f"(the recipe was chosen on validation questions), {ppl_tokens} perplexity tokens, latency "
                  "interleaved run by run")
    mark = time.perf_counter()
    result = evaluate(float_dir, [compiled], limit=limit, ppl_tokens=ppl_tokens,
                      json_out=workdir / f"eval.{recipe}.{fmt}.json", progress=True)
    stages.append(("evaluate", time.perf_counter() - mark))
    stages.append(("total", time.perf_counter() - start))
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(format_table(result))
    out.print("stage times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in stages))


def _demo_format(fmt: str) -> str:
    """The format the demo compiles to: ``mqc`` needs the runtime-ops library (built by ``make setup``)."""
    from mqc.runtime_ops import RuntimeOpsNotBuiltError, library_path

    if fmt == "qdq":
        return fmt
    try:
        library_path("cpu")
    except RuntimeOpsNotBuiltError as exc:
        if fmt == "mqc":
            raise InputModelError(f"--format mqc: {exc}") from exc
        console.print("[yellow]the runtime-ops library is not built (MQC_SKIP_RUNTIME_OPS=1 or no compiler): "
                      "compiling the QDQ form instead, which stock onnxruntime runs but which is slower than float "
                      "on the CPU; `make setup` builds the library[/yellow]")
        return "qdq"
    return "mqc"


def _register_model_commands() -> None:
    try:
        from mqc.models import commands
    except ImportError:  # the models package is optional at import time of the compiler
        return
    for name in ("export", "eval"):
        command = getattr(commands, f"{name}_command", None)
        if command is not None:
            main.add_command(command, name)


_register_model_commands()


if __name__ == "__main__":
    main()
