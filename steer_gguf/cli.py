"""The `steer-gguf` command line."""
from __future__ import annotations

import json
import os
import sys

import click

from .errors import SteerError, printable
from .fileio import check_output

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


def llama_options(f):
    """The llama.cpp options every model-loading command takes."""
    f = click.option("--ctx", "-c", "n_ctx", type=click.IntRange(min=16), default=None,
                     help="context size in tokens  [default: the model's, at most 4096]")(f)
    f = click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="layers to offload to the GPU (-1: all)")(f)
    f = click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: llama.cpp's choice)")(f)
    f = click.option("--engine", type=click.Choice(["graph", "hook"]), default="graph", show_default=True,
                     help="graph: steering inside llama.cpp's gating; hook: eval-callback oracle")(f)
    f = click.option("--force", is_flag=True, help="apply a profile made for another model of the same shape")(f)
    f = click.option("--verbose", is_flag=True, help="show llama.cpp's log")(f)
    return f


def open_model(model: str, profile: str | None, n_ctx: int, n_gpu_layers: int, n_threads: int | None,
               engine: str, force: bool, verbose: bool, **extra):
    from .steered import SteeredLlama

    threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    return SteeredLlama(model, profile=profile, engine=engine, force=force, n_ctx=n_ctx,
                        n_gpu_layers=n_gpu_layers, verbose=verbose, **threads, **extra)


def _model_arg():
    return click.argument("model", type=click.Path())


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="steer-gguf")
def main():
    """Steer Mixture-of-Experts GGUF models by their experts (SteerMoE for llama.cpp)."""


# ---- info / models ----------------------------------------------------------------------------
@main.command()
@_model_arg()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info(model, as_json):
    """MoE layout, gating and fingerprint of a GGUF model."""
    from .model import model_info

    i = model_info(model)
    if as_json:
        click.echo(json.dumps(i.to_dict(), indent=2))
        return
    # the path and the architecture come from the user and the file: shown escaped
    click.echo(f"model         {printable(i.path)}")
    click.echo(f"architecture  {printable(i.architecture)}")
    click.echo(f"layers        {i.n_layer} ({len(i.moe_layers)} MoE: {_layer_list(i.moe_layers)})")
    click.echo(f"experts       {i.n_expert}, {i.n_expert_used} per token"
               + (f", {i.n_shared_expert} shared" if i.n_shared_expert else ""))
    if i.n_expert_groups > 1:
        click.echo(f"groups        {i.n_expert_groups}, {i.n_group_used} used per token")
    click.echo(f"gating        {i.gating}" + (" + selection bias" if i.has_selection_bias else "")
               + (" + router bias" if i.has_router_bias else ""))
    click.echo(f"fingerprint   {i.fingerprint}")


def _layer_list(xs: list[int]) -> str:
    if xs and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}"
    return ",".join(map(str, xs))


@main.command()
def models():
    """The MoE architectures steer-gguf supports, and how far each is verified."""
    from .runtime import PACKAGE_DIR

    for p in (PACKAGE_DIR / "models.txt", PACKAGE_DIR.parent / "models.txt"):
        if p.is_file():
            click.echo(p.read_text(), nl=False)
            return
    raise SteerError("models.txt is missing from the installation")


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
def generate(model, prompt, profile, chat, system, max_tokens, temperature, seed, as_json, **kw):
    """Generate one answer, steered by --profile if given."""
    llm = open_model(model, profile, seed=seed, **kw)
    text = _complete(llm, prompt, chat, system, max_tokens, temperature, seed)
    if as_json:
        click.echo(json.dumps({"model": model, "profile": llm.profile.name if llm.profile else None,
                               "prompt": prompt, "text": text}))
    else:
        click.echo(text)


def _messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _complete(llm, prompt, chat, system, max_tokens, temperature, seed) -> str:
    for what, text in (("--prompt", prompt), ("--system", system)):
        _check_arg_text(text, what)
    n = len(llm.chat_tokens(_messages(prompt, system), add_generation_prompt=True) if chat
            else llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    if n >= llm.n_ctx():
        raise SteerError(f"the prompt has {n} tokens and the context only {llm.n_ctx()}: raise --ctx or shorten it")
    if chat:
        r = llm.create_chat_completion(messages=_messages(prompt, system), max_tokens=max_tokens,
                                       temperature=temperature, seed=seed)
        return r["choices"][0]["message"]["content"] or ""
    r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return r["choices"][0]["text"]


def _check_arg_text(text: str | None, what: str) -> None:
    # bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer takes
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise SteerError(f"{what}: not valid UTF-8 text") from None


@main.command()
@_model_arg()
@click.option("--profile", type=click.Path(), help="steering profile (JSON)")
@click.option("--system", help="system message")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@llama_options
def chat(model, profile, system, max_tokens, temperature, seed, **kw):
    """Interactive chat. Commands: /profile PATH|off, /compare, /quit."""
    from .chat import ChatSession, run_chat

    _check_arg_text(system, "--system")
    llm = open_model(model, profile, seed=seed, **kw)
    session = ChatSession(llm, system, max_tokens, temperature, seed, out=click.echo,
                          err=lambda msg: click.echo(msg, err=True))
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
def trace(model, prompt, messages, chat, profile, output, **kw):
    """Record the experts every token is routed to, in every MoE layer."""
    if (prompt is None) == (messages is None):
        raise SteerError("give exactly one of -p TEXT or --messages FILE")
    if not (output.endswith(".json") or output.endswith(".npz")):
        raise SteerError(f"{output}: output must end in .json or .npz")
    check_output(output, "trace")
    _check_arg_text(prompt, "--prompt")
    msgs = None
    if messages is not None:
        msgs = _read_messages(messages)
    elif chat:
        msgs = [{"role": "user", "content": prompt}]
    llm = open_model(model, profile, **kw)
    tr = llm.trace(messages=msgs, add_generation_prompt=chat) if msgs is not None else llm.trace(text=prompt)
    tr.save(output)
    click.echo(f"traced {len(tr)} tokens x {len(tr.layers)} MoE layers x k={tr.experts.shape[2]} -> {output}")


def _read_messages(path: str) -> list[dict]:
    from .fileio import read_json

    data = read_json(path)
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise SteerError(f"{path}: expected a non-empty list of messages")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SteerError(f"{path}: messages[{i}] must be an object with string 'role' and 'content'")
    return data


# ---- profiles -----------------------------------------------------------------------------------
@main.group(cls=_Group)
def profile():
    """Show, validate and make steering profiles."""


@profile.command("show")
@click.argument("path", type=click.Path())
@click.option("--plot", type=click.Path(), help="also draw which experts it forces, per layer (PNG)")
def profile_show(path, plot):
    """Print a profile's summary and experts."""
    from .profile import Profile

    if plot:
        from .fileio import check_output
        from .plots import require

        check_output(plot, "plot")
        require()
    from .profile import printable

    p = Profile.load(path)
    m = p.model
    click.echo(p.summary())
    click.echo(f"model: {printable(m.architecture or '?')} n_layer={m.n_layer or '?'} n_expert={m.n_expert or '?'} "
               f"k={m.n_expert_used} fingerprint={printable(m.fingerprint or '(none: checked by shape)')}")
    for r in p.experts:
        rd = f"  risk_diff={r.risk_diff:+.4f}" if r.risk_diff is not None else ""
        click.echo(f"  layer {r.layer:3d} expert {r.expert:4d} {r.action}{rd}")
    for b in p.bias:
        click.echo(f"  layer {b.layer:3d} expert {b.expert:4d} bias {b.value:+g}")
    if p.provenance:
        click.echo(f"provenance: {json.dumps(p.provenance)}")
    if plot:
        from .plots import profile_plot

        n_layer = m.n_layer or 1 + max([r.layer for r in p.experts] + [b.layer for b in p.bias], default=0)
        n_expert = m.n_expert or 1 + max([r.expert for r in p.experts] + [b.expert for b in p.bias], default=0)
        profile_plot(p, n_layer, n_expert, plot)
        click.echo(f"plot -> {plot}")


@profile.command("validate")
@click.argument("path", type=click.Path())
@click.option("--model", type=click.Path(), help="also check it fits this GGUF model")
@click.option("--force", is_flag=True, help="accept a fingerprint mismatch (shape must still match)")
def profile_validate(path, model, force):
    """Check a profile (and, with --model, that it applies to a model)."""
    from .model import model_info
    from .profile import Profile

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
@click.option("--reverse", is_flag=True, help="steer toward behavior 2 instead of behavior 1")
@click.option("--eps", type=float, default=0.01, show_default=True)
@click.option("--name", help="profile name (default: the output file's name)")
@click.option("--output", "-o", required=True, type=click.Path(), help="profile JSON to write")
def profile_make(table, model, k, activate, deactivate, reverse, eps, name, output):
    """Make a profile from a detection table (ours, or SteerMoE's count columns)."""
    from .detect import DetectionTable
    from .model import model_info

    if (model is None) == (k is None):
        raise SteerError("give exactly one of --model MODEL or --k K")
    check_output(output, "profile")
    t = DetectionTable.from_csv(table)
    target = model_info(model) if model else k
    name = name or os.path.splitext(os.path.basename(output))[0]
    p = t.make_profile(target, activate=activate, deactivate=deactivate, reverse=reverse, eps=eps, name=name,
                       provenance={"table": os.path.basename(table)})
    p.save(output)
    click.echo(f"{output}: {p.summary()}")


# ---- detection and statistics ----------------------------------------------------------------------
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
@llama_options
def detect(model, pairs, output, max_pairs, batch_tokens, skip_bad, n_top, method, candidates, greedy_steps,
           greedy_pool, margin_tokens, plot, plot_pick, **kw):
    """Find behavior-linked experts: risk difference of routing on paired examples, or the
    measured effect of forcing each expert (--method causal)."""
    import time

    from .datasets import load_pairs
    from .detect import detect as run_detect

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
    ps = load_pairs(pairs, skip_bad=skip_bad, max_pairs=max_pairs)
    llm = open_model(model, None, **kw)
    if method != "risk_diff":
        _detect_causal(llm, ps, output, method, candidates, greedy_steps or 8, greedy_pool or 32, batch_tokens,
                       skip_bad, n_top, margin_tokens)
        _detect_plot(output, plot, plot_pick, llm.info)
        return
    t0 = time.perf_counter()
    tokens = [0]
    with click.progressbar(length=2 * len(ps), label="prefilling", file=sys.stderr,
                           item_show_func=lambda _: f"{tokens[0] / max(1e-9, time.perf_counter() - t0):,.0f} target tok/s"
                           ) as bar:
        def progress(done, total, n_target):
            tokens[0] += n_target
            bar.update(done - bar.pos, current_item=done)

        table = run_detect(llm, ps, batch_tokens=batch_tokens, skip_bad=skip_bad, on_progress=progress)
    for w in ps.skipped:
        click.echo(f"warning: skipped {w}", err=True)
    if ps.skipped:
        click.echo(f"warning: {len(ps.skipped)} bad lines or pairs skipped", err=True)
    table.to_csv(output)
    dt = time.perf_counter() - t0
    click.echo(f"{table.meta.get('pairs')} pairs, {len(table)} (layer, expert) rows -> {output} ({dt:.1f} s)")
    click.echo(f"signal concentration: {table.concentration()} experts hold half of the total |risk_diff|")
    if n_top:
        click.echo("  rank layer expert   p1      p2      risk_diff")
        for i, r in enumerate(table.top(n_top)):
            click.echo(f"  {i + 1:4d} {r.layer:5d} {r.expert:6d}   {r.p1:.4f}  {r.p2:.4f}  {r.risk_diff:+.4f}")
    _detect_plot(output, plot, plot_pick, llm.info)


def _detect_plot(table_path: str, plot: str | None, pick: int, info) -> None:
    """The written table as a heatmap, with the experts `profile make --activate pick` takes."""
    if not plot:
        return
    from .detect import DetectionTable
    from .plots import detection_heatmap

    t = DetectionTable.from_csv(table_path)
    picked = []
    if pick:
        n_pos = min(pick, int((t.score > 0).sum()), info.n_expert_used * len(info.moe_layers))
        if n_pos:
            try:
                picked = [(r.layer, r.expert) for r in t.make_profile(info, activate=n_pos).experts]
            except SteerError:  # fewer pickable experts under the k-per-layer cap: outline none
                picked = []
    what = "risk difference" if t.effect is None else "causal effect"
    detection_heatmap(t, plot, picked, f"{os.path.basename(table_path)}: {what} (red: behavior 1, "
                      f"blue: behavior 2); outlined: the top {len(picked)} to activate")
    click.echo(f"heatmap -> {plot}")


def _detect_causal(llm, ps, output, method, candidates, greedy_steps, greedy_pool, batch_tokens, skip_bad, n_top,
                   margin_tokens=None):
    import time

    from .causal import causal_detect

    t0 = time.perf_counter()
    with click.progressbar(length=1, label="forcing experts", file=sys.stderr,
                           item_show_func=lambda s: s or "") as bar:
        def progress(done, total, what):
            if bar.length != total:  # a new phase (candidates, then each greedy step)
                bar.length, bar.pos = total, 0
            bar.update(done - bar.pos, current_item=what)

        res = causal_detect(llm, ps, candidates=candidates, greedy_steps=greedy_steps if method == "causal-greedy" else 0,
                            greedy_pool=greedy_pool, batch_tokens=batch_tokens, skip_bad=skip_bad,
                            margin_tokens=margin_tokens, on_progress=progress)
    for w in ps.skipped:
        click.echo(f"warning: skipped {w}", err=True)
    table = res.table
    table.to_csv(output)
    dt = time.perf_counter() - t0
    click.echo(f"{table.meta.get('pairs')} pairs, {res.n_candidates} candidates forced on and off -> {output} "
               f"({dt:.1f} s; {res.seconds_per_candidate:.3f} s per candidate)")
    click.echo(f"unsteered margin log P(target 1) - log P(target 2): {res.baseline:+.4f} nats per pair; "
               f"{table.concentration()} experts hold half of the total |effect|")
    if n_top:
        click.echo("  rank layer expert  risk_diff  effect_on  effect_off   effect")
        for i, r in enumerate(table.top(n_top)):
            if r.effect is None:
                break
            click.echo(f"  {i + 1:4d} {r.layer:5d} {r.expert:6d}   {r.risk_diff:+.4f}   {r.effect_on:+.4f}    "
                       f"{r.effect_off:+.4f}  {r.effect:+.4f}")
    for g in res.greedy:
        click.echo(f"  greedy toward behavior {1 if g.toward > 0 else 2}, step {g.step}: {g.action} layer {g.layer} "
                   f"expert {g.expert}: margin {g.margin:+.4f} (gain {g.gain:+.4f})")


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
    from .datasets import load_prompts
    from .stats import routing_stats, save_heatmap

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
    from .fileio import atomic_write

    atomic_write(output, json.dumps(s, indent=2) + "\n")
    for layer in s["layers"]:
        click.echo(f"layer {layer['layer']:3d}: entropy {layer['entropy_bits']:.2f}/{layer['max_entropy_bits']:.2f} bits, "
                   f"max/mean load {layer['max_over_mean']:.2f}, most used {layer['most_used'][:3]}")
    if plot:
        save_heatmap(s, plot)
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
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="requests allowed to wait behind the running one; more get 503")
@click.option("--access-log", is_flag=True, help="log every request")
@click.option("--max-body", type=click.IntRange(min=1), default=8, show_default=True,
              help="largest request body in MiB; larger ones get 413")
@llama_options
def serve(model, default_profile, profiles_dir, host, port, api_key, max_queue, access_log, max_body, **kw):
    """OpenAI-compatible HTTP server; requests pick a profile with "steer_profile"."""
    try:
        from . import server
    except ImportError as e:
        raise SteerError(f"serve needs the server extra ({e.name} is missing): pip install 'steer-gguf[server]'") from None

    if profiles_dir is not None and not os.path.isdir(profiles_dir):
        raise SteerError(f"{profiles_dir}: --profiles-dir is not a directory")
    if api_key is not None and not api_key.strip():
        raise SteerError("--api-key is empty")
    sock = server.bind(host, port)
    with sock:
        llm = open_model(model, None, **kw)
        profiles = server.load_profiles(llm, profiles_dir, default_profile, force=kw["force"])
        server.warn_excluded(profiles)
        worker = server.Worker(llm, max_queue)
        state = server.ServerState(llm, profiles, worker, model_id=os.path.basename(model), api_key=api_key,
                                   max_body=max_body * 1024 * 1024)
        try:
            server.run(state, sock, access_log=access_log)
        finally:
            worker.stopping = True
            with llm.lock:  # let a running generation finish before the model goes
                llm.close()


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="steer-gguf-demo", show_default=True,
              help="directory for the detection tables and profiles it makes")
@click.option("--show", "n_show", type=click.IntRange(min=0), default=3, show_default=True,
              help="held-out prompts shown side by side per behavior")
@click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("--model", "model_name", type=click.Choice(["demo", "natural"]), default="demo", show_default=True,
              help="demo: trained to tie styles to experts; natural: same data, no routing supervision")
@click.option("--controls", type=click.IntRange(min=0), default=None,
              help="random-expert controls per profile in a final eval  [default: 0 demo, 3 natural]")
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


def _eval_setup(llm, behavior_name, eval_set, max_items, judge_model, kw):
    """(EvalSet, Behavior, judge) from the options; the judge model is loaded here."""
    from .evalsets import load_eval_set
    from .judges import ANSWERS, GGUFJudge, behavior, judge_answers

    b = behavior(behavior_name) if behavior_name else None
    if eval_set is None:
        if b is None:
            raise SteerError("give --behavior NAME (and optionally --eval-set FILE)")
        eval_set = b.eval_set
    es = load_eval_set(eval_set, max_items=max_items)
    if b is None:
        if not es.has_answers:
            raise SteerError(f"{eval_set}: give --behavior NAME to pick a judge (or put answer_0 and answer_1 "
                             f"on every item)")
        b = ANSWERS
    elif b.rule is judge_answers and not es.has_answers:
        raise SteerError(f"{eval_set}: the {b.name} judge needs answer_0 and answer_1 on every item")
    judge = None
    if judge_model:
        judge = GGUFJudge(judge_model, b, n_threads=kw.get("n_threads"), n_gpu_layers=kw.get("n_gpu_layers", 0))
    return es, b, judge


def _sampling(samples, temperature, max_tokens, seed, parallel):
    from .evaluate import Sampling

    _nonneg("parallel", parallel, 1)
    _nonneg("samples", samples, 1)
    _nonneg("max-tokens", max_tokens, 1)
    if not (temperature >= 0):
        raise SteerError(f"--temperature must be >= 0, got {temperature}")
    return Sampling(samples, temperature, max_tokens, seed)


class _Progress:
    """A progress bar on stderr, fed with finished work units."""

    def __init__(self, total: int, label: str):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


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
             seed, judge_model, parallel, toward, text_file, json_out, plot, **kw):
    """Does a profile change the behavior, against random-expert controls, and at what cost?"""
    from .evaluate import conditions_for, evaluate, work_units
    from .fileio import check_output, decode_text, read_bytes
    from .profile import Profile

    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel)
    for out in (json_out, plot):
        if out is not None:
            check_output(out)
    if plot:
        from .plots import require

        require()
    text = decode_text(read_bytes(text_file, "text file"), text_file) if text_file else None
    profs = [Profile.load(p) for p in profiles]
    llm = open_model(model, None, **kw)
    for path, p in zip(profiles, profs):
        p.check(llm.info, force=kw["force"], source=path)
    es, b, judge = _eval_setup(llm, behavior_name, eval_set, max_items, judge_model, kw)
    conds = conditions_for(profs, llm.info, b.labels, n_controls, seed, toward)
    with _Progress(work_units(es, len(conds), sampling), "generating") as bar:
        report = evaluate(llm, es, b, profs, sampling=sampling, judge=judge, text=text, conditions=conds,
                          on_progress=bar, parallel=parallel)
    click.echo(report.table())
    if json_out:
        from .fileio import atomic_write

        atomic_write(json_out, report.to_json())
    if plot:
        from .plots import eval_plot

        eval_plot(report, plot)
    wrote = [x for x in (json_out, plot) if x]
    if wrote:
        click.echo("wrote " + ", ".join(wrote))


@main.command("tune")
@_model_arg()
@click.option("--table", required=True, type=click.Path(), help="detection table (CSV) to build profiles from")
@_judge_options
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
@click.option("--output", "-o", required=True, type=click.Path(), help="the chosen profile (JSON)")
@click.option("--json", "json_out", type=click.Path(), help="write the sweep (every point) as JSON")
@click.option("--plot", type=click.Path(), help="effect and KL against profile size (PNG)")
@llama_options
def tune_cmd(model, table, behavior_name, eval_set, max_items, samples, temperature, max_tokens, seed, judge_model,
             parallel, reverse, max_kl, alpha, tolerance, n_controls, sizes, arms, output, json_out, plot, **kw):
    """Sweep profile sizes on held-out prompts; write the smallest profile with the largest significant shift."""
    from .detect import DetectionTable
    from .fileio import atomic_write, check_output
    from .tune import sweep_table, tune

    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel)
    size_list = _int_list("sizes", sizes) if sizes else None
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip())
    for out in (output, json_out, plot):
        if out is not None:
            check_output(out)
    if plot:
        from .plots import require

        require()
    t = DetectionTable.from_csv(table)
    llm = open_model(model, None, **kw)
    es, b, judge = _eval_setup(llm, behavior_name, eval_set, max_items, judge_model, kw)
    name = os.path.splitext(os.path.basename(output))[0]
    from .tune import default_sizes, sweep_profiles

    n_points = len(sweep_profiles(t, llm.info, reverse, size_list or default_sizes(llm.info), arm_list)[0])
    with _Progress(len(es) * sampling.samples * (1 + n_points + n_controls), "sweeping") as bar:
        res = tune(llm, t, es, b, reverse=reverse, max_kl=max_kl, alpha=alpha, tolerance=tolerance, sizes=size_list,
                   arms=arm_list, sampling=sampling, judge=judge, name=name, controls=n_controls, control_seed=seed,
                   on_progress=bar, parallel=parallel)
    click.echo(sweep_table(res))
    for s in res.skipped:
        click.echo(f"skipped {s}")
    if json_out:
        atomic_write(json_out, json.dumps({"format": "steer-gguf.tune/1", "target": res.target, "alpha": alpha,
                                           "max_kl": max_kl, "points": res.points, "skipped": res.skipped,
                                           "report": res.report.to_dict()}, indent=1) + "\n")
    if plot:
        from .plots import sweep_plot

        sweep_plot(res.points, plot, f"tune {b.name} toward {res.target}", max_kl)
    if res.chosen is None:
        raise SteerError(f"no point of the sweep shifted {b.name} toward {res.target} significantly "
                         f"(p < {alpha}){' within the KL budget' if max_kl is not None else ''}; no profile written")
    res.chosen.save(output)
    tp = res.chosen.provenance["tune"]
    click.echo(f"{output}: {res.chosen.summary()}; {res.target} {100 * tp['rate']:.0f}% "
               f"({tp['effect_points']:+.0f} points, p={tp['p']:.1e}, KL {tp['kl']:.4f})")


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
              judge_model, parallel, n_controls, sizes, output, plot, **kw):
    """Safety sparsity: how few experts carry refusal, and how fast deactivating them bypasses it."""
    from .audit import audit, default_sizes
    from .datasets import load_pairs
    from .detect import DetectionTable
    from .detect import detect as run_detect
    from .fileio import atomic_write, check_output

    behavior_name = behavior_name or "safety"
    _nonneg("controls", n_controls)
    sampling = _sampling(samples, temperature, max_tokens, seed, parallel)
    size_list = [int(x) for x in _int_list("sizes", sizes)] if sizes else None
    for out in (output, plot):
        if out is not None:
            check_output(out)
    if plot:
        from .plots import require

        require()
    if table and pairs:
        raise SteerError("give --pairs or --table, not both")
    t = DetectionTable.from_csv(table) if table else None
    llm = open_model(model, None, **kw)
    es, b, judge = _eval_setup(llm, behavior_name, eval_set, max_items, judge_model, kw)
    if t is None:
        spec = pairs or b.pairs
        if spec is None:
            raise SteerError("give --pairs (detection pairs for this behavior)")
        click.echo(f"detecting on {spec} ...", err=True)
        t = run_detect(llm, load_pairs(spec))
    size_list = size_list if size_list is not None else default_sizes(t, llm.info)
    n_cond = 1 + sum(1 + n_controls + 1 for n in size_list if n > 0)
    with _Progress(len(es) * sampling.samples * n_cond, "auditing") as bar:
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
