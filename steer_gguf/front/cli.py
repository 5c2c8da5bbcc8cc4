"""The `steer-gguf` command line: options, and a call into the module that does each job."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from ..errors import SteerError, printable
from ..fileio import check_output

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SteerError as e:
            click.echo(f"steer-gguf: error: {printable(str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("steer-gguf: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)

    def resolve_command(self, ctx, args):
        # `detect compare A B` is a command of its own, while `detect MODEL ...` stays as it was
        name, cmd, rest = super().resolve_command(ctx, args)
        if name == "detect" and rest[:1] == ["compare"]:
            return "detect compare", detect_compare, rest[1:]
        return name, cmd, rest


def llama_options(f):
    """The llama.cpp options every model-loading command takes."""
    f = click.option("--ctx", "-c", "n_ctx", type=click.IntRange(min=16), default=None,
                     help="context size in tokens  [default: the model's, at most 4096]")(f)
    f = click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="layers to offload to the GPU (-1: all)")(f)
    f = click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads, kept fixed  [default: the physical cores other processes leave "
                          "free, re-measured while it runs]")(f)
    f = click.option("--engine", type=click.Choice(["graph", "hook"]), default="graph", show_default=True,
                     help="graph: steering inside llama.cpp's gating; hook: eval-callback oracle")(f)
    f = click.option("--force", is_flag=True, help="apply a profile made for another model of the same shape")(f)
    f = click.option("--verbose", is_flag=True, help="show llama.cpp's log")(f)
    f = click.option("--rpc", metavar="HOST:PORT[,...]", expose_value=False, callback=_connect_rpc,
                     help="offload layers to these llama.cpp rpc-server processes (with --n-gpu-layers; "
                          "docs/rpc.md)")(f)
    return f


def _connect_rpc(ctx, param, value):
    # the servers join llama.cpp's devices for this whole process, before any model loads
    if value:
        from ..engine.rpc import connect

        connect(value)


def topk_option(f):
    """--topk K: experts per token in every MoE layer, with or without a --profile."""
    return click.option("--topk", type=click.IntRange(min=1), default=None,
                        help="experts per token in every MoE layer (the model's own k if not given); "
                             "replaces a profile's own topk")(f)


def thread_kwargs(n_threads: int | None) -> dict:
    """--threads N as llama-cpp-python arguments (None: llama.cpp's choice)."""
    return {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}


def open_model(model: str, profile: str | None, n_ctx: int, n_gpu_layers: int, n_threads: int | None,
               engine: str, force: bool, verbose: bool, topk: int | None = None, **extra):
    from ..engine.steered import SteeredLlama

    return SteeredLlama(model, profile=profile, engine=engine, force=force, n_ctx=n_ctx, topk=topk,
                        n_gpu_layers=n_gpu_layers, verbose=verbose, **thread_kwargs(n_threads), **extra)


def _model_arg(unless: str | None = None):
    """MODEL, a GGUF file (any part of a split one), or -hf USER/REPO[:QUANT] as llama.cpp takes
    it; the command is called with `model` as the local path either way (None where the flag
    named `unless` is given and no model is)."""
    def decorate(f):
        @functools.wraps(f)
        def run(*args, model, hf_repo, hf_file, **kw):
            if unless and kw.get(unless) and not (model or hf_repo or hf_file):
                return f(*args, model=None, **kw)
            return f(*args, model=resolve_model(model, hf_repo, hf_file), **kw)

        run = click.option("--hf-file", help="with -hf: the file in the repository to use (instead of a quant tag)")(run)
        run = click.option("-hf", "--hf-repo", metavar="USER/REPO[:QUANT]",
                           help="a model from the Hugging Face Hub, as llama.cpp's -hf (no quant: Q4_K_M, else Q8_0, else the first GGUF)")(run)
        return click.argument("model", type=click.Path(), required=False)(run)
    return decorate


def resolve_model(model: str | None, hf_repo: str | None, hf_file: str | None) -> str:
    if hf_file and not hf_repo:
        raise SteerError("--hf-file needs -hf USER/REPO")
    if model and hf_repo:
        raise SteerError(f"give a MODEL file or -hf {hf_repo}, not both")
    if not hf_repo:
        if not model:
            raise SteerError("give a MODEL (a GGUF file) or -hf USER/REPO[:QUANT]")
        return model
    from ..hub import fetch_model

    m = fetch_model(hf_repo, hf_file)
    click.echo(f"steer-gguf: {m.repo}: {' + '.join(m.files)} in {printable(os.path.dirname(m.path))}", err=True)
    return m.path


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="steer-gguf")
def main():
    """Steer Mixture-of-Experts GGUF models by their experts (SteerMoE for llama.cpp)."""


# ---- info / models ----------------------------------------------------------------------------
@main.command()
@_model_arg(unless="system")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--system", is_flag=True, help="instead: how steer-gguf was built and which ggml backends run here")
def info(model, as_json, system):
    """MoE layout, gating and fingerprint of a GGUF model (--system: the build and its backends)."""
    if system:
        if model:
            raise SteerError("info --system takes no MODEL")
        from ..engine.sysinfo import system_info

        s = system_info()
        click.echo(json.dumps(s.to_dict(), indent=2) if as_json else s.report())
        return
    from ..model import model_info

    from ..model import verification

    i = model_info(model)
    status = verification(i.architecture)
    if status == "refused":
        click.echo(f"steer-gguf: warning: steer-gguf refuses to run {printable(i.architecture)} models "
                   f"(`steer-gguf models` says why)", err=True)
    elif status != "verified":
        click.echo(f"steer-gguf: warning: {printable(i.architecture)} is {status or 'not listed'} in models.txt: "
                   f"steer-gguf's tests do not check it; trace a profile before trusting it", err=True)
    if as_json:
        click.echo(json.dumps(i.to_dict(), indent=2))
        return
    click.echo(i.report())


@main.command()
def models():
    """The MoE architectures steer-gguf supports, and how far each is verified."""
    from ..model import supported_models

    click.echo(supported_models(), nl=False)


# ---- generate / chat ----------------------------------------------------------------------------
@main.command()
@_model_arg()
@click.option("--prompt", "-p", required=True, help="prompt text (a user message with --chat)")
@click.option("--profile", type=click.Path(), help="steering profile (JSON)")
@click.option("--chat", is_flag=True, help="use the model's chat template")
@click.option("--system", help="system message (with --chat)")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@llama_options
@topk_option
def generate(model, prompt, profile, chat, system, max_tokens, temperature, seed, as_json, **kw):
    """Generate one answer, steered by --profile if given."""
    from .prompts import complete

    llm = open_model(model, profile, seed=seed, **kw)
    text = complete(llm, prompt, chat, system, max_tokens, temperature, seed)
    if as_json:
        click.echo(json.dumps({"model": model, "profile": llm.profile.name if llm.profile else None,
                               "prompt": prompt, "text": text}))
    else:
        click.echo(text)


@main.command()
@_model_arg()
@click.option("--profile", type=click.Path(),
              help="steering profile (JSON); with --profiles-dir also a name there, or none")
@click.option("--profiles-dir", type=click.Path(), help="directory of profiles (*.json) /profile names by file stem")
@click.option("--system", help="system message")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@llama_options
@topk_option
def chat(model, profile, profiles_dir, system, max_tokens, temperature, seed, **kw):
    """Interactive chat. Commands: /profile NAME|PATH|off, /compare, /quit."""
    from .chat import ChatSession, chat_profiles, run_chat
    from ..profile import with_topk
    from .prompts import check_text
    from ..serve.registry import check_dir

    check_text(system, "--system")
    check_dir(profiles_dir)
    named = profiles_dir is not None
    llm = open_model(model, None if named else profile, seed=seed, **kw)
    registry = chat_profiles(llm, profiles_dir, profile, force=kw["force"]) if named else None
    if registry is not None and kw["topk"] is not None:  # the registry's default replaced the profile
        llm.set_profile(with_topk(llm.profile, kw["topk"], llm.info))
    session = ChatSession(llm, system, max_tokens, temperature, seed, out=click.echo,
                          err=lambda msg: click.echo(msg, err=True), profiles=registry, topk=kw["topk"])
    run_chat(session, os.path.basename(model))


# ---- trace ---------------------------------------------------------------------------------------
@main.command()
@_model_arg()
@click.option("--prompt", "-p", help="text to trace")
@click.option("--messages", type=click.Path(), help="JSON file with a list of chat messages")
@click.option("--chat", is_flag=True, help="with -p: trace it as a user message in the chat template")
@click.option("--profile", type=click.Path(), help="trace under this steering profile")
@click.option("--output", "-o", required=True, type=click.Path(), help="trace.json or trace.npz")
@llama_options
@topk_option
def trace(model, prompt, messages, chat, profile, output, **kw):
    """Record the experts every token is routed to, in every MoE layer."""
    from ..detect.datasets import read_messages
    from .prompts import as_messages, check_text

    if (prompt is None) == (messages is None):
        raise SteerError("give exactly one of -p TEXT or --messages FILE")
    if not (output.endswith(".json") or output.endswith(".npz")):
        raise SteerError(f"{output}: output must end in .json or .npz")
    check_output(output, "trace")
    check_text(prompt, "--prompt")
    msgs = None
    if messages is not None:
        msgs = read_messages(messages)
    elif chat:
        msgs = as_messages(prompt, None)
    llm = open_model(model, profile, **kw)
    tr = llm.trace(messages=msgs, add_generation_prompt=chat) if msgs is not None else llm.trace(text=prompt)
    tr.save(output)
    click.echo(f"traced {len(tr)} tokens x {len(tr.layers)} MoE layers x k={tr.experts.shape[2]} -> {output}")


# ---- profiles -----------------------------------------------------------------------------------
@main.group(cls=_Group)
def profile():
    """Show, validate and make steering profiles."""


@profile.command("show")
@click.argument("path", type=click.Path())
@click.option("--plot", type=click.Path(), help="also draw which experts it forces, per layer (PNG)")
def profile_show(path, plot):
    """Print a profile's summary and experts."""
    from ..profile import Profile

    if plot:
        from .plots import require

        check_output(plot, "plot")
        require()
    p = Profile.load(path)
    click.echo(p.report())
    if plot:
        from .plots import profile_plot

        profile_plot(p, *p.extent(), plot)
        click.echo(f"plot -> {plot}")


@profile.command("validate")
@click.argument("path", type=click.Path())
@click.option("--model", type=click.Path(), help="also check it fits this GGUF model")
@click.option("--force", is_flag=True, help="accept a fingerprint mismatch (shape must still match)")
def profile_validate(path, model, force):
    """Check a profile (and, with --model, that it applies to a model)."""
    from ..model import model_info
    from ..profile import Profile

    p = Profile.load(path)
    if model:
        p.check(model_info(model), force=force, source=path)
        click.echo(f"{path}: valid for {model}")
    else:
        click.echo(f"{path}: valid ({p.summary()})")


@profile.command("make")
@click.argument("table", type=click.Path())
@click.option("--model", type=click.Path(), help="bind the profile to this model (identity and shape)")
@click.option("--k", "k", type=click.IntRange(min=1), help="experts per token, when no --model is given")
@click.option("--activate", type=click.IntRange(min=0), default=0, show_default=True,
              help="experts to force on (risk_diff > 0, at most k per layer)")
@click.option("--deactivate", type=click.IntRange(min=0), default=0, show_default=True,
              help="experts to force off (risk_diff < 0)")
@click.option("--deactivate-per-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="instead of --deactivate: the best N to force off in every MoE layer (bakeable by pruning)")
@click.option("--reverse", is_flag=True, help="steer toward behavior 2 instead of behavior 1")
@click.option("--eps", type=float, default=0.01, show_default=True)
@click.option("--name", help="profile name (default: the output file's name)")
@click.option("--output", "-o", required=True, type=click.Path(), help="profile JSON to write")
@click.option("--min-confidence", type=float, default=None,
              help="skip experts whose bootstrap confidence in their sign is below C (0.975: about 'the 95%% "
                   "interval excludes 0')")
def profile_make(table, model, k, activate, deactivate, deactivate_per_layer, reverse, eps, name, output,
                 min_confidence):
    """Make a profile from a detection table (ours, or SteerMoE's count columns)."""
    from ..detect.risk import DetectionTable
    from ..model import model_info

    if (model is None) == (k is None):
        raise SteerError("give exactly one of --model MODEL or --k K")
    check_output(output, "profile")
    t = DetectionTable.from_csv(table)
    target = model_info(model) if model else k
    name = name or os.path.splitext(os.path.basename(output))[0]
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise SteerError(f"--min-confidence must lie in 0..1, got {min_confidence}")
    p = t.make_profile(target, activate=activate, deactivate=deactivate, reverse=reverse, eps=eps, name=name,
                       provenance={"table": os.path.basename(table)}, deactivate_per_layer=deactivate_per_layer,
                       min_confidence=min_confidence)
    p.save(output)
    click.echo(f"{output}: {p.summary()}")
    _warn_uncertain(t, p)


def _warn_uncertain(t, p) -> None:
    """What the table says about the profile's experts: the verdict, and those whose
    interval crosses 0."""
    if t.verdict:
        click.echo(f"detection: {t.verdict}")
    weak = t.crossing_zero(p.experts)
    if weak:
        shown = ", ".join(f"layer {r.layer} expert {r.expert} [{lo:+.3f}, {hi:+.3f}]" for r, lo, hi in weak[:5])
        more = f" and {len(weak) - 5} more" if len(weak) > 5 else ""
        click.echo(f"warning: {len(weak)} of the {len(p.experts)} experts have a 95% interval that crosses 0: "
                   f"{shown}{more}; --min-confidence 0.975 refuses them", err=True)


# ---- bake ------------------------------------------------------------------------------------------
@main.command()
@_model_arg()
@click.option("--profile", required=True, type=click.Path(), help="steering profile (JSON) to write into the file")
@click.option("--output", "-o", required=True, type=click.Path(), help="the baked GGUF to write")
@click.option("--method", type=click.Choice(["auto", "bias", "prune"]), default="auto", show_default=True,
              help="bias: edit the router/selection bias; prune: remove deactivated experts; auto: bias if the "
                   "file has one")
@click.option("--drop-unbakeable", is_flag=True, help="bake what can be baked and report the rest as dropped")
@click.option("--check", is_flag=True, help="compare the baked file (no profile) with the source (with the profile)")
@click.option("--merge", is_flag=True, help="write one file for a split model (default: split like the source)")
@click.option("--json", "json_out", type=click.Path(), help="write the plan, the file and the check as JSON")
@llama_options
def bake(model, profile, output, method, drop_unbakeable, check, merge, json_out, n_ctx, n_gpu_layers, n_threads,
         engine, force, verbose):
    """Write a profile into a copy of the model for stock llama.cpp, Ollama and LM Studio."""
    from ..bake.write import bake_profile

    check_output(output, "baked model")
    if json_out:
        check_output(json_out, "JSON report")
    plan, res = bake_profile(model, profile, output, method, drop_unbakeable, force=force, merge=merge)
    click.echo(plan.report())
    where = res.path if len(res.parts) == 1 else f"{res.path} (part 1 of {len(res.parts)}; the others beside it)"
    click.echo(f"{where}: {res.bytes / 2**20:.1f} MiB written in {res.seconds:.1f} s "
               f"({len(res.tensors_edited)} tensors edited, the rest copied byte for byte)")
    doc = {"plan": plan.to_dict(), "output": {"path": res.path, "parts": res.parts, "bytes": res.bytes,
                                              "seconds": res.seconds, "tensors_edited": res.tensors_edited}}
    if check:
        from ..bake.check import check_bake

        rep = check_bake(plan, res.path, n_ctx=n_ctx or 1024, n_gpu_layers=n_gpu_layers, verbose=verbose,
                         **thread_kwargs(n_threads))
        click.echo(rep.report(plan))
        doc["check"] = rep.to_dict(plan)
    stem = os.path.splitext(os.path.basename(output))[0]
    ollama = (f"printf 'FROM ./{os.path.basename(res.path)}\\n' > Modelfile && ollama create {stem} -f Modelfile"
              f"   (the chat template comes from the file)" if len(res.parts) == 1 else
              "bake again with --merge: Ollama imports one GGUF file, not a split one (ollama#5245)")
    click.echo(f"use it:\n  llama.cpp:  llama-server -m {res.path}\n  Ollama:     {ollama}\n"
               f"  LM Studio:  lms import {res.path}")
    if json_out:
        from ..fileio import atomic_write

        atomic_write(json_out, json.dumps(doc, indent=2) + "\n")


@main.command()
@_model_arg()
@click.option("--calibration", required=True, help="the workload: a text file, a JSONL of chats, or builtin:NAME")
@click.option("--keep", type=float, help="fraction of each MoE layer's experts to keep, e.g. 0.75")
@click.option("--drop", type=int, help="experts to drop from every MoE layer (instead of --keep)")
@click.option("--criterion", type=click.Choice(["reap", "frequency"]), default="reap", show_default=True,
              help="reap: mean gate weight x expert output norm over the tokens routed to it; frequency: how "
                   "often it is routed to")
@click.option("--heldout", type=click.Path(), help="held-out text for KL and perplexity [default: the built-in "
              "neutral text]")
@click.option("--seeds", type=int, default=5, show_default=True, help="random prunes of the same size to compare")
@click.option("--last-layer-stride", type=int, default=None,
              help="the last layer's saliency from 1 calibration token in N (its experts run for the output "
                   "row only in prefill, so every token costs a whole layer's expert work); default: every "
                   "token from 25 MoE layers up, else 1 in ceil(25 / MoE layers), keeping that cost under 4%; "
                   "never below 10 tokens per expert; 1: every token")
@click.option("--sweep", help="keep fractions to compare, e.g. 0.9,0.75,0.5 (prints size against cost; no file)")
@click.option("--output", "-o", type=click.Path(), help="the pruned GGUF (required but with --sweep)")
@click.option("--merge", is_flag=True, help="write one file for a split model (default: split like the source)")
@click.option("--json", "json_out", type=click.Path(), help="write the report as JSON")
@click.option("--plot", type=click.Path(), help="kept/dropped experts per layer and the size-cost curves (PNG)")
@llama_options
def prune(model, calibration, keep, drop, criterion, heldout, seeds, last_layer_stride, sweep, output, merge, json_out,
          plot, **kw):
    """A smaller model: drop the experts a workload uses least, measured against random pruning."""
    from ..bake import prune as pr
    from ..fileio import atomic_write
    from .progress import Progress

    if sweep is not None:
        if output is not None or keep is not None or drop is not None:
            raise SteerError("--sweep compares keep fractions and writes no model: drop --output/--keep/--drop")
        fracs = _float_list("sweep", sweep)
    elif output is None:
        raise SteerError("prune needs --output (or --sweep F,... to compare sizes without writing)")
    _outputs(output, json_out, plot=plot)
    if heldout is not None and os.path.abspath(heldout) == os.path.abspath(calibration):
        raise SteerError(f"{heldout}: the held-out text is the calibration data; its cost would be measured "
                         f"on what chose the experts")
    held_name, held = _text_or_neutral(heldout, "held-out text")
    from ..model import model_info

    info = model_info(model)
    keeps = sorted({pr.n_keep(info, f, None) for f in fracs}, reverse=True) if sweep is not None else \
        [pr.n_keep(info, keep, drop)]
    llm = open_model(model, None, **kw)
    windows = pr.calibration_windows(llm, calibration, *_calibration_data(calibration))
    with Progress(len(windows), "recording expert use") as bar:
        rep, kept = pr.run_prune(llm, calibration, windows, held, held_name, keeps, criterion, seeds=seeds,
                                 on_progress=bar, last_stride=last_layer_stride)
    click.echo(rep.table())
    if output is not None:
        from ..bake.check import check_bake
        from ..bake.plan import plan_bake
        from ..bake.write import package_version, write_baked

        k = keeps[0]
        p = pr.drop_profile(info, kept[k], os.path.splitext(os.path.basename(output))[0])
        p.provenance["prune"] = {"criterion": criterion, "calibration": calibration,
                                 "calibration_tokens": rep.calibration_tokens, "kept_per_layer": k,
                                 "last_layer_stride": rep.last_layer_stride}
        plan = plan_bake(info, p, "prune", force=llm.force)
        res = write_baked(plan, output, package_version(), merge=merge)
        rep.written = res.path
        chk = check_bake(plan, res.path, n_ctx=kw.get("n_ctx") or 1024, n_gpu_layers=kw.get("n_gpu_layers", 0),
                         verbose=kw.get("verbose", False), **thread_kwargs(kw.get("n_threads")))
        rep.check = chk.to_dict(plan)
        click.echo(f"{res.path}: {res.bytes / 2**20:.1f} MiB written ({k} of {info.n_expert} experts kept per "
                   f"MoE layer, by {criterion})")
        click.echo(chk.report(plan))
    if json_out:
        atomic_write(json_out, json.dumps(rep.to_dict(), indent=1) + "\n")
    if plot:
        from .plots import prune_plot

        prune_plot(rep, kept[keeps[0]], plot)


def _calibration_data(spec: str) -> tuple[list | None, str | None]:
    """(conversations, None) for a JSONL of chats or builtin:NAME, else (None, the text)."""
    from ..detect.datasets import BUILTIN_PREFIX, load_prompts
    from ..fileio import decode_text, read_bytes

    if spec.startswith(BUILTIN_PREFIX) or spec.endswith(".jsonl"):
        return load_prompts(spec), None
    return None, decode_text(read_bytes(spec, "calibration text"), spec)


def _text_or_neutral(path: str | None, what: str) -> tuple[str, str]:
    """(its name, its text): a user's text file, or with none the built-in neutral text."""
    from ..evaluation.measure import NEUTRAL_TEXT
    from ..fileio import decode_text, read_bytes

    if path is None:
        return "the built-in neutral text", NEUTRAL_TEXT.read_text(encoding="utf-8")
    return path, decode_text(read_bytes(path, what), path)


def _float_list(name: str, text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteerError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not xs:
        raise SteerError(f"--{name}: no value given")
    return xs


# ---- detection and statistics ----------------------------------------------------------------------
def _trust_options(f):
    """How detect measures its own uncertainty (detect/confidence.py)."""
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="seed of the bootstrap, the permutations and the splits")(f)
    f = click.option("--splits", type=int, default=20, show_default=True,
                     help="random halvings of the pairs for split-half stability")(f)
    f = click.option("--permutations", type=int, default=1000, show_default=True,
                     help="pair swaps for the permutation null")(f)
    f = click.option("--bootstrap", type=int, default=1000, show_default=True,
                     help="resamples of the pairs for each expert's 95%% interval")(f)
    return f


@main.command()
@_model_arg()
@click.option("--pairs", required=True, help="pair dataset: a JSONL file or builtin:NAME")
@click.option("--output", "-o", required=True, type=click.Path(), help="detection table (CSV) to write")
@click.option("--max-pairs", type=click.IntRange(min=1), help="use only the first N pairs")
@click.option("--batch", "batch_tokens", type=click.IntRange(min=64), default=2048, show_default=True,
              help="tokens per llama.cpp batch (many conversations each)")
@click.option("--skip-bad", is_flag=True, help="skip bad dataset lines with a warning instead of failing")
@click.option("--top", "n_top", type=click.IntRange(min=0), default=10, show_default=True,
              help="experts to show in the summary")
@click.option("--method", type=click.Choice(["risk_diff", "causal", "causal-greedy"]), default="risk_diff",
              show_default=True, help="risk_diff: routing statistics; causal: force each expert on and off and "
              "measure the behavior; causal-greedy: causal, then a greedy set search")
@click.option("--candidates", type=click.IntRange(min=1), default=None,
              help="causal: measure only the top M experts by |risk_diff|  [default: all]")
@click.option("--greedy-steps", type=click.IntRange(min=1), default=None,
              help="causal-greedy: at most S activations and S deactivations per direction  [default: 8]")
@click.option("--greedy-pool", type=click.IntRange(min=1), default=None,
              help="causal-greedy: moves considered per direction, by single effect  [default: 32]")
@click.option("--margin-tokens", type=click.IntRange(min=1), default=None,
              help="causal: score only the first K tokens of each target (1: where a reply picks its style)  "
                   "[default: the whole target]")
@click.option("--plot", type=click.Path(), help="also draw the table as a layers x experts heatmap (PNG)")
@click.option("--plot-pick", type=click.IntRange(min=0), default=10, show_default=True,
              help="outline the experts `profile make --activate N` would pick")
@_trust_options
@llama_options
def detect(model, pairs, output, max_pairs, batch_tokens, skip_bad, n_top, method, candidates, greedy_steps,
           greedy_pool, margin_tokens, plot, plot_pick, bootstrap, permutations, splits, seed, **kw):
    """Find behavior-linked experts: risk difference of routing on paired examples, or the
    measured effect of forcing each expert (--method causal). Each expert gets a 95% interval
    over pairs; a permutation null and split-half stability give the verdict printed last.

    `steer-gguf detect compare A.csv B.csv [--plot OUT.png]`: how far tables agree."""
    import time

    from ..detect.causal import causal_detect
    from ..detect.causal import summary as causal_summary
    from ..detect.datasets import load_pairs
    from ..detect.risk import detect as run_detect
    from ..detect.risk import summary
    from .progress import phase_bar, prefill_bar

    if not output.endswith(".csv"):
        raise SteerError(f"{output}: the detection table is a .csv file")
    check_output(output, "detection table")
    if plot:
        from .plots import require

        check_output(plot, "plot")
        require()
    if method == "risk_diff" and (candidates is not None or margin_tokens is not None):
        raise SteerError("--candidates and --margin-tokens need --method causal or causal-greedy")
    if method != "causal-greedy" and (greedy_steps is not None or greedy_pool is not None):
        raise SteerError("--greedy-steps and --greedy-pool need --method causal-greedy")
    for name, v in (("bootstrap", bootstrap), ("permutations", permutations), ("splits", splits)):
        _nonneg(name, v, 1)
    trust = {"bootstrap": bootstrap, "permutations": permutations, "splits": splits, "seed": seed}
    ps = load_pairs(pairs, skip_bad=skip_bad, max_pairs=max_pairs)
    llm = open_model(model, None, **kw)
    t0 = time.perf_counter()
    if method == "risk_diff":
        with prefill_bar(2 * len(ps)) as progress:
            table = run_detect(llm, ps, batch_tokens=batch_tokens, skip_bad=skip_bad, on_progress=progress, **trust)
        _warn_skipped(ps.skipped)
        if ps.skipped:
            click.echo(f"warning: {len(ps.skipped)} bad lines or pairs skipped", err=True)
        table.to_csv(output)
        click.echo(summary(table, output, time.perf_counter() - t0, n_top))
    else:
        with phase_bar("forcing experts") as progress:
            res = causal_detect(llm, ps, candidates=candidates,
                                greedy_steps=(greedy_steps or 8) if method == "causal-greedy" else 0,
                                greedy_pool=greedy_pool or 32, batch_tokens=batch_tokens, skip_bad=skip_bad,
                                margin_tokens=margin_tokens, on_progress=progress, **trust)
        _warn_skipped(ps.skipped)
        res.table.to_csv(output)
        click.echo(causal_summary(res, output, time.perf_counter() - t0, n_top))
    if plot:
        from .plots import detection_plot

        detection_plot(output, plot, plot_pick, llm.info)
        click.echo(f"heatmap -> {plot}")


@click.command("detect compare", context_settings=CONTEXT)
@click.argument("table_a", type=click.Path())
@click.argument("tables", nargs=-1, required=True, type=click.Path())
@click.option("--sizes", help="top-N sizes to compare, e.g. 1,2,4,8  [default: the sizes tune sweeps]")
@click.option("--plot", type=click.Path(), help="scatter of risk differences and the top-N overlap (PNG)")
def detect_compare(table_a, tables, sizes, plot):
    """Agreement of detection tables of one model: A against each of B...: two quantizations,
    two pair sets, or a SteerMoE count CSV (layer, expert, a1, a2, d1, d2) against ours."""
    from ..detect.compare import compare
    from ..detect.risk import DetectionTable

    size_list = _int_list("sizes", sizes) if sizes else None
    _outputs(plot=plot)
    a = DetectionTable.from_csv(table_a)
    results = [compare(a, DetectionTable.from_csv(b), table_a, b, size_list) for b in tables]
    for i, c in enumerate(results):
        if i:
            click.echo("")
        click.echo("\n".join(c.lines()))
    if plot:
        from .plots import compare_plot

        compare_plot(results, plot)
        click.echo(f"plot -> {plot}")


def _warn_skipped(skipped: list[str]) -> None:
    for w in skipped:
        click.echo(f"warning: skipped {w}", err=True)


@main.command()
@_model_arg()
@click.option("--prompts", required=True, help="prompts: a JSONL file or builtin:NAME")
@click.option("--output", "-o", required=True, type=click.Path(), help="statistics JSON to write")
@click.option("--plot", type=click.Path(), help="also draw a layers x experts heatmap (PNG; needs matplotlib)")
@click.option("--max-prompts", type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--profile", type=click.Path(), help="statistics under this steering profile")
@click.option("--batch", "batch_tokens", type=click.IntRange(min=64), default=2048, show_default=True,
              help="tokens per llama.cpp batch (a longer prompt gets a batch of its own)")
@llama_options
def stats(model, prompts, output, plot, max_prompts, profile, batch_tokens, **kw):
    """Expert usage per MoE layer: counts, shares, entropy, load balance."""
    from ..detect.datasets import load_prompts
    from ..fileio import atomic_write
    from ..detect.stats import layer_lines, routing_stats

    check_output(output, "statistics")
    if plot:
        check_output(plot, "plot")
    convs = load_prompts(prompts)[:max_prompts]
    if not convs:
        raise SteerError(f"{prompts}: no prompts")
    if plot:
        from .plots import require

        require()
    llm = open_model(model, profile, **kw)
    s = routing_stats(llm, convs, batch_tokens=batch_tokens)
    atomic_write(output, json.dumps(s, indent=2) + "\n")
    for line in layer_lines(s):
        click.echo(line)
    if plot:
        from .plots import usage_plot

        usage_plot(s, plot)
    click.echo(f"{s['tokens']} tokens from {s['prompts']} prompts -> {output}" + (f", {plot}" if plot else ""))


# ---- serve ---------------------------------------------------------------------------------------
@main.command()
@_model_arg()
@click.option("--profile", "default_profile",
              help="default steering profile: a name in --profiles-dir, a profile file, or none")
@click.option("--profiles-dir", type=click.Path(), help="directory of profiles (*.json) requests name by file stem")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port")
@click.option("--api-key", envvar="STEER_GGUF_API_KEY",
              help="require Authorization: Bearer KEY on /v1 (or set STEER_GGUF_API_KEY)")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="requests decoded together, each under its own profile, each with --ctx tokens (graph engine)")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="requests allowed to wait behind the running ones; more get 503")
@click.option("--access-log", is_flag=True, help="log every request")
@click.option("--max-body", type=click.IntRange(min=1), default=8, show_default=True,
              help="largest request body in MiB; larger ones get 413")
@llama_options
@topk_option
def serve(model, default_profile, profiles_dir, host, port, api_key, parallel, max_queue, access_log, max_body,
          topk, open_browser=False, **kw):
    """OpenAI-compatible HTTP server and its web page at /; requests pick a profile with "steer_profile"."""
    try:
        from ..serve import app as server
    except ImportError as e:
        raise SteerError(f"serve needs the server extra ({e.name} is missing): pip install 'steer-gguf[server]'") from None

    from ..serve.registry import NONE, check_dir, load_profiles, warn_excluded
    from ..serve.scheduler import BatchExecutor, SerialExecutor, Worker

    check_dir(profiles_dir)
    if api_key is not None and not api_key.strip():
        raise SteerError("--api-key is empty")
    if topk is not None and kw["engine"] == "hook":
        raise SteerError("--topk (experts per token) needs the graph engine, not the hook engine")
    sock = server.bind(host, port)
    with sock:
        llm = open_model(model, None, **kw)
        profiles = load_profiles(llm.info, profiles_dir, default_profile, force=kw["force"])
        warn_excluded(profiles)
        # the hook engine steers a whole context, not a sequence: one request at a time
        executor = BatchExecutor(llm, parallel, llm.n_ctx()) if llm.engine == "graph" else SerialExecutor(llm)
        state = server.ServerState(llm, profiles, Worker(executor, max_queue), model_id=os.path.basename(model),
                                   api_key=api_key, max_body=max_body * 1024 * 1024, topk=topk)
        if topk is not None:
            state.profile_with_k(NONE, None, topk)  # a K the model cannot take fails here, not per request
        try:
            server.run(state, sock, access_log=access_log, open_browser=open_browser)
        finally:
            executor.shut_down()  # a running generation finishes before the model goes


@main.command(params=serve.params)
def ui(**kw):
    """`serve`, then open its web page (chat, routing, expert board, detection) in the browser."""
    serve.callback(**kw, open_browser=True)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="steer-gguf-demo", show_default=True,
              help="directory for the detection tables and profiles it makes")
@click.option("--show", "n_show", type=click.IntRange(min=0), default=3, show_default=True,
              help="held-out prompts shown side by side per behavior")
@click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("--model", "model_name", type=click.Choice(["demo", "natural", "bilingual"]), default="demo",
              show_default=True, help="demo: trained to tie styles to experts; natural: same data, no routing "
              "supervision; bilingual: English/Russian on real text, no routing supervision")
@click.option("--controls", type=click.IntRange(min=0), default=None,
              help="random-expert controls per profile in a final eval  [default: 0 demo, 3 natural, 2 bilingual]")
def demo(out_dir, n_show, n_threads, model_name, controls):
    """The whole workflow on a bundled model: detect, make profiles, compare."""
    from .demo import run_demo

    run_demo(out_dir, n_show=n_show, n_threads=n_threads, log=click.echo, model=model_name, controls=controls)


# ---- eval / tune / audit -------------------------------------------------------------------------
def _judge_options(f):
    """What every command that measures behavior takes."""
    f = click.option("--behavior", "behavior_name", help="built-in behavior: its judge and held-out eval set")(f)
    f = click.option("--eval-set", "eval_set", help="held-out prompts (JSONL, or builtin:NAME) instead of the behavior's")(f)
    f = click.option("--max-items", type=click.IntRange(min=1), help="use only the first N eval items")(f)
    f = click.option("--samples", type=int, default=2, show_default=True, help="answers per prompt")(f)
    f = click.option("--temperature", type=float, default=0.7, show_default=True)(f)
    f = click.option("--max-tokens", type=int, default=64, show_default=True, help="tokens per answer")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="sampling and control seed")(f)
    f = click.option("--judge", "judge_model", type=click.Path(), help="an instruct GGUF that judges the answers")(f)
    f = click.option("--parallel", type=int, default=4, show_default=True,
                     help="conversations decoded together (1: one at a time)")(f)
    f = click.option("--phase", type=click.Choice(["all", "generation", "prompt"]), default="all", show_default=True,
                     help="what the profiles steer: prompt and answer, the generated tokens only, the prompt only")(f)
    return f


def _eval_options(f):
    f = _judge_options(f)
    f = click.option("--controls", "n_controls", type=int, default=2, show_default=True,
                     help="random-expert controls per profile")(f)
    f = click.option("--toward", help="the label profiles steer toward (default: from each profile)")(f)
    return f


def _nonneg(name: str, v: int, minimum: int = 0) -> int:
    if v < minimum:
        raise SteerError(f"--{name} must be >= {minimum}, got {v}")
    return v


def _outputs(*paths: str | None, plot: str | None = None) -> None:
    """Every output checked, and matplotlib when a plot is asked for, before any work."""
    for out in (*paths, plot):
        if out is not None:
            check_output(out)
    if plot:
        from .plots import require

        require()


def _judging(behavior_name, eval_set, max_items, judge_model, kw):
    from ..evaluation.judges import judging

    return judging(behavior_name, eval_set, max_items, judge_model, n_threads=kw.get("n_threads"),
                   n_gpu_layers=kw.get("n_gpu_layers", 0))


def _sampling(samples, temperature, max_tokens, seed, parallel, phase):
    from ..evaluation.measure import Sampling

    _nonneg("parallel", parallel, 1)
    _nonneg("samples", samples, 1)
    _nonneg("max-tokens", max_tokens, 1)
    if not (temperature >= 0):
        raise SteerError(f"--temperature must be >= 0, got {temperature}")
    return Sampling(samples, temperature, max_tokens, seed, phase)


@main.command("eval")
@_model_arg()
@click.option("--profile", "profiles", multiple=True, required=True, type=click.Path(),
              help="profile to evaluate (repeatable)")
@_eval_options
@click.option("--text", "text_file", type=click.Path(), help="also report perplexity on this text")
@click.option("--json", "json_out", type=click.Path(), help="write the summary and every outcome as JSON")
@click.option("--plot", type=click.Path(), help="rates with intervals and KL (PNG)")
@llama_options
def eval_cmd(model, profiles, behavior_name, eval_set, max_items, n_controls, samples, temperature, max_tokens,
             seed, judge_model, parallel, phase, toward, text_file, json_out, plot, **kw):
    """Does a profile change the behavior, against random-expert controls, and at what cost?"""
    from ..evaluation.measure import conditions_for, evaluate, work_units
    from ..fileio import decode_text, read_bytes
    from ..profile import Profile
    from .progress import Progress

    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel, phase)
    _outputs(json_out, plot=plot)
    text = decode_text(read_bytes(text_file, "text file"), text_file) if text_file else None
    profs = [Profile.load(p) for p in profiles]
    llm = open_model(model, None, **kw)
    for path, p in zip(profiles, profs):
        p.check(llm.info, force=kw["force"], source=path)
    es, b, judge = _judging(behavior_name, eval_set, max_items, judge_model, kw)
    conds = conditions_for(profs, llm.info, b.labels, n_controls, seed, toward)
    with Progress(work_units(es, len(conds), sampling), "generating") as bar:
        report = evaluate(llm, es, b, profs, sampling=sampling, judge=judge, text=text, conditions=conds,
                          on_progress=bar, parallel=parallel)
    click.echo(report.table())
    if json_out:
        from ..fileio import atomic_write

        atomic_write(json_out, report.to_json())
    if plot:
        from .plots import eval_plot

        eval_plot(report, plot)
    wrote = [x for x in (json_out, plot) if x]
    if wrote:
        click.echo("wrote " + ", ".join(wrote))


@main.command("tune")
@_model_arg()
@click.option("--table", type=click.Path(), help="detection table (CSV) to build profiles from")
@_judge_options
@click.option("--topk", "topk_list", help="sweep experts per token instead, e.g. 1,2,3: speed beside KL, "
              "perplexity and (with --behavior) rates; no --table")
@click.option("--topk-schemes", default="global", show_default=True,
              help="with --topk: which layers take K: global, edges (first and last quarter), middle")
@click.option("--text", "text_file", type=click.Path(), help="with --topk: the text for speed, KL and perplexity "
              "[default: the built-in neutral text]")
@click.option("--rounds", type=int, default=5, show_default=True, help="with --topk: interleaved timing rounds")
@click.option("--reverse", is_flag=True, help="steer toward behavior 2 instead of behavior 1")
@click.option("--max-kl", type=float, help="KL budget (nats/token on the neutral text); default: none")
@click.option("--alpha", type=float, default=0.01, show_default=True, help="significance level of a shift")
@click.option("--tolerance", type=float, default=2.0, show_default=True,
              help="points below the largest shift that still count as reaching it")
@click.option("--sizes", help="profile sizes to try, e.g. 1,2,4,8  [default: powers of 2 up to k x MoE layers]")
@click.option("--arms", default=",".join(("activate", "deactivate", "both")), show_default=True,
              help="which kinds of profile to sweep")
@click.option("--controls", "n_controls", type=int, default=2, show_default=True,
              help="random-expert controls of the chosen profile (recorded in its provenance)")
@click.option("--output", "-o", type=click.Path(), help="the chosen profile (JSON; required but with --topk)")
@click.option("--json", "json_out", type=click.Path(), help="write the sweep (every point) as JSON")
@click.option("--plot", type=click.Path(), help="effect and KL against profile size (PNG)")
@llama_options
def tune_cmd(model, table, behavior_name, eval_set, max_items, samples, temperature, max_tokens, seed, judge_model,
             parallel, phase, topk_list, topk_schemes, text_file, rounds, reverse, max_kl, alpha, tolerance,
             n_controls, sizes, arms, output, json_out, plot, **kw):
    """Sweep profile sizes on held-out prompts; write the smallest profile with the largest significant shift.
    With --topk: sweep experts per token, speed beside quality."""
    from ..detect.risk import DetectionTable
    from ..fileio import atomic_write
    from .progress import Progress
    from ..evaluation.tune import chosen_summary, sweep_table, to_json, tune, work_units

    if topk_list is not None:
        return _tune_topk(model, topk_list, topk_schemes, text_file, rounds, table, behavior_name, eval_set,
                          max_items, samples, temperature, max_tokens, seed, judge_model, parallel, phase, max_kl,
                          output, json_out, plot, kw)
    if table is None or output is None:
        raise SteerError("tune needs --table and --output (or --topk K,... to sweep experts per token)")
    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel, phase)
    size_list = _int_list("sizes", sizes) if sizes else None
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip())
    _outputs(output, json_out, plot=plot)
    t = DetectionTable.from_csv(table)
    llm = open_model(model, None, **kw)
    es, b, judge = _judging(behavior_name, eval_set, max_items, judge_model, kw)
    name = os.path.splitext(os.path.basename(output))[0]
    units = work_units(t, llm.info, es, sampling, reverse, size_list, arm_list, n_controls)
    with Progress(units, "sweeping") as bar:
        res = tune(llm, t, es, b, reverse=reverse, max_kl=max_kl, alpha=alpha, tolerance=tolerance, sizes=size_list,
                   arms=arm_list, sampling=sampling, judge=judge, name=name, controls=n_controls, control_seed=seed,
                   on_progress=bar, parallel=parallel)
    click.echo(sweep_table(res))
    for s in res.skipped:
        click.echo(f"skipped {s}")
    if json_out:
        atomic_write(json_out, to_json(res, alpha, max_kl))
    if plot:
        from .plots import sweep_plot

        sweep_plot(res.points, plot, f"tune {b.name} toward {res.target}", max_kl)
    if res.chosen is None:
        raise SteerError(f"no point of the sweep shifted {b.name} toward {res.target} significantly "
                         f"(p < {alpha}){' within the KL budget' if max_kl is not None else ''}; no profile written")
    res.chosen.save(output)
    click.echo(chosen_summary(res, output))


def _tune_topk(model, topk_list, topk_schemes, text_file, rounds, table, behavior_name, eval_set, max_items, samples,
               temperature, max_tokens, seed, judge_model, parallel, phase, max_kl, output, json_out, plot, kw):
    from ..evaluation import topk_sweep
    from ..fileio import atomic_write
    from .progress import Progress

    if table is not None:
        raise SteerError("--topk sweeps experts per token, not a detection table: drop --table")
    if plot:
        raise SteerError("--plot draws the profile-size sweep; with --topk use --json")
    if output is not None and max_kl is None:
        raise SteerError("--topk with --output needs --max-kl: the profile written is the point with the fewest "
                         "experts per token within that KL budget")
    ks = _int_list("topk", topk_list)
    schemes = [x.strip() for x in topk_schemes.split(",") if x.strip()]
    bad = [x for x in schemes if x not in topk_sweep.SCHEMES]
    if bad or not schemes:
        raise SteerError(f"--topk-schemes: {', '.join(bad) or 'none given'}: choose among "
                         f"{', '.join(topk_sweep.SCHEMES)}")
    _outputs(output, json_out)
    text_name, text = _text_or_neutral(text_file, "text file")
    es = b = judge = sampling = None
    if behavior_name or eval_set:
        sampling = _sampling(samples, temperature, max_tokens, seed, parallel, phase)
    llm = open_model(model, None, **kw)
    if sampling is not None:
        es, b, judge = _judging(behavior_name, eval_set, max_items, judge_model, kw)
    n_points = len(set(ks)) * len(schemes)
    with Progress(topk_sweep.work_units(n_points, rounds, es, sampling), "sweeping K") as bar:
        res = topk_sweep.sweep_topk(llm, ks, schemes, text, text_name, rounds=rounds, max_kl=max_kl, eval_set=es,
                                    behavior=b, sampling=sampling, judge=judge, parallel=parallel,
                                    on_progress=bar)
    click.echo(res.table())
    if json_out:
        atomic_write(json_out, res.to_json())
    if output is not None:
        if res.chosen is None:
            raise SteerError(f"no point of the sweep is within the KL budget {max_kl}; no profile written")
        res.chosen.provenance.update(topk_sweep.provenance(res))
        res.chosen.name = os.path.splitext(os.path.basename(output))[0]
        res.chosen.save(output)
        click.echo(f"{output}: {res.chosen.summary()}")


def _int_list(name: str, text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteerError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not xs or min(xs) < 1:
        raise SteerError(f"--{name}: expected positive integers, got {text!r}")
    return xs


@main.command("audit")
@_model_arg()
@click.option("--pairs", help="detection pairs  [default: the behavior's, e.g. builtin:safety]")
@click.option("--table", type=click.Path(), help="a detection table (CSV) instead of detecting from --pairs")
@_judge_options
@click.option("--controls", "n_controls", type=int, default=2, show_default=True,
              help="random-expert controls per attack size")
@click.option("--sizes", help="attack sizes N to try, e.g. 1,2,4,8  [default: 0 and powers of 2 up to 64]")
@click.option("--output", "-o", required=True, type=click.Path(), help="the report (JSON)")
@click.option("--plot", type=click.Path(), help="the attack curve (PNG)")
@llama_options
def audit_cmd(model, pairs, table, behavior_name, eval_set, max_items, samples, temperature, max_tokens, seed,
              judge_model, parallel, phase, n_controls, sizes, output, plot, **kw):
    """Safety sparsity: how few experts carry refusal, and how fast deactivating them bypasses it."""
    from ..evaluation.audit import audit, default_sizes, work_units
    from ..detect.datasets import load_pairs
    from ..detect.risk import DetectionTable
    from ..detect.risk import detect as run_detect
    from ..fileio import atomic_write
    from .progress import Progress

    behavior_name = behavior_name or "safety"
    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel, phase)
    size_list = [int(x) for x in _int_list("sizes", sizes)] if sizes else None
    _outputs(output, plot=plot)
    if table and pairs:
        raise SteerError("give --pairs or --table, not both")
    t = DetectionTable.from_csv(table) if table else None
    llm = open_model(model, None, **kw)
    es, b, judge = _judging(behavior_name, eval_set, max_items, judge_model, kw)
    if t is None:
        spec = pairs or b.pairs
        if spec is None:
            raise SteerError("give --pairs (detection pairs for this behavior)")
        click.echo(f"detecting on {spec} ...", err=True)
        t = run_detect(llm, load_pairs(spec))
    size_list = size_list if size_list is not None else default_sizes(t, llm.info)
    with Progress(work_units(es, sampling, size_list, n_controls), "auditing") as bar:
        res = audit(llm, t, es, b, sizes=size_list, controls=n_controls, sampling=sampling, judge=judge, seed=seed,
                    on_progress=bar, parallel=parallel)
    click.echo(res.summary())
    atomic_write(output, json.dumps(res.to_dict(), indent=1, ensure_ascii=False) + "\n")
    if plot:
        from .plots import audit_plot

        audit_plot(res.curve, plot, f"audit {b.name}: refusal as its top experts are deactivated")
    click.echo("wrote " + ", ".join(x for x in (output, plot) if x))


if __name__ == "__main__":
    main()
