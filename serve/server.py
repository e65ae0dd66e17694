"""``finetune serve RECIPE|MODEL.gguf``: start the local server (OpenAI-compatible API + web chat page).

With a RECIPE it serves the export stage's GGUF of ``serve.quant`` (runs/<name>/export/) and keeps conversations
and feedback in runs/<name>/serve/; with a .gguf file it serves that file and keeps them next to it. The model
lives in worker processes (serve/worker.py); this process only speaks HTTP, so a crash in llama.cpp costs one
request, not the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from finetune.errors import UserError
from finetune.recipe import Recipe, ServeConfig

API_KEY_ENV = "FINETUNE_API_KEY"


@dataclass
class Target:
    gguf: Path
    name: str                 # the model name the API reports
    config: ServeConfig
    store_dir: Path
    recipe: Recipe | None     # None when serving a bare .gguf
    recipe_path: str | None


def resolve_target(target: str, overrides: list[str] | None = None) -> Target:
    """A recipe (its exported GGUF) or a .gguf file -> what to serve, with which settings, storing where."""
    from finetune import recipe as recipe_mod
    from finetune.feedback import gguf_store_dir
    from finetune.runs import require_stage

    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        # Only serve.* overrides make sense without a recipe; they go through the same validation.
        bad = [o for o in overrides or [] if not o.startswith("serve.")]
        if bad:
            raise UserError(f"with a .gguf file only serve.* overrides apply (e.g. serve.n_ctx=4096), got: {bad}")
        data = recipe_mod.apply_overrides({"name": "serve"}, overrides or [])
        config = recipe_mod.validate_dict(data, source="overrides").serve
        return Target(path.resolve(), path.stem, config, gguf_store_dir(path), None, None)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{target}: give a recipe (.yaml) or a model file (.gguf)")
    recipe = recipe_mod.load(path, overrides)
    manifest = require_stage(recipe, "export", str(path))
    ggufs: dict[str, str] = (manifest.get("outputs") or {}).get("gguf") or {}
    quant = recipe.serve.quant
    if quant == "auto":  # the type export picked for export.fit_gb (export/quantization.json says why)
        quant = (manifest.get("outputs") or {}).get("picked")
        if not quant:
            raise UserError(f"serve.quant: auto needs export.fit_gb, so that `finetune export {target}` picks a type "
                            f"(none was picked for run '{recipe.name}'); set export.fit_gb or serve.quant to one of: "
                            f"{', '.join(sorted(ggufs)) or 'none'}")
    if quant not in ggufs:
        have = ", ".join(sorted(ggufs)) or "none"
        raise UserError(
            f"serve.quant: the export of run '{recipe.name}' has no {quant} GGUF (it has: {have}). "
            f"Set serve.quant to one of those (e.g. `finetune serve {target} serve.quant=F16`), or add {quant} "
            "to export.quantizations and run `finetune export` again."
        )
    gguf = Path(ggufs[quant])
    if not gguf.is_file():
        raise UserError(f"{gguf} (listed in {recipe.run_dir('export')}/manifest.json) is missing; run "
                        f"`finetune export {target}` again")
    return Target(gguf.resolve(), f"{recipe.name}-{quant}", recipe.serve, recipe.run_dir("serve"), recipe, str(path))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_host_names(host: str) -> list[str]:
    """The Host header names a loopback server answers: the local names plus the address it is bound to."""
    return list(dict.fromkeys(["127.0.0.1", "localhost", "::1", host.lower()]))


def console_logging(level: str) -> None:
    """One line per 4xx/5xx answer and per worker crash (logger finetune.serve) on the console."""
    logger = logging.getLogger("finetune.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s finetune serve: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel({"trace": "DEBUG"}.get(level, level.upper()))


def worker_options(target: Target, *, threads: int | None = None) -> dict:
    config = target.config
    chat_template = None
    if config.chat_template:
        base = target.recipe.base_dir if target.recipe else Path.cwd()
        template_path = Path(config.chat_template)
        template_path = template_path if template_path.is_absolute() else base / template_path
        if not template_path.is_file():
            raise UserError(f"serve.chat_template: {template_path} not found")
        chat_template = template_path.read_text(encoding="utf-8")
    cores = os.cpu_count() or 1
    return {"gguf": str(target.gguf), "n_ctx": config.n_ctx, "chat_template": chat_template,
            "threads": threads or config.threads or max(1, cores // config.workers),
            # trained and served the same way: the recipe's reasoning setting (a bare .gguf: the template's default)
            "reasoning": target.recipe.data.reasoning if target.recipe else "auto"}


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (before the model loads, so a busy port fails at once). ``::`` is
    dual-stack (IPv6 and IPv4), as users expect of "every address"; asyncio alone would make it IPv6-only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(2048)
    except ValueError:
        sock.close()
        raise UserError(f"--host {host}: not an IP address or host name (e.g. 127.0.0.1, ::1, 0.0.0.0, ::)") from None
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: no such address on this machine ({exc.strerror}); use 127.0.0.1, "
                            "0.0.0.0 (every IPv4 address), :: (every address) or one of this machine's") from None
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running there? "
                        "Choose another port with --port N") from None
    sock.set_inheritable(True)
    return sock


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="finetune serve",
        description="Serve a fine-tuned model: OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models), /health, and a web chat page at /.",
    )
    p.add_argument("target", metavar="RECIPE|MODEL.gguf", help="a recipe (serves its export's serve.quant GGUF) or a .gguf")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. serve.n_ctx=4096 serve.workers=2")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1). Non-loopback needs an API key")
    p.add_argument("--port", type=int, help="port (default serve.port, 8765)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV}; safer than a flag)")
    p.add_argument("--store", help="folder for conversations and feedback (default runs/<name>/serve or next to the GGUF)")
    p.add_argument("--chat-template", help="a .jinja chat template, only for a GGUF that lacks one")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="console log level: warning (default) shows one line per 4xx/5xx answer and per worker "
                   "crash; info also shows every request")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    ns = p.parse_intermixed_args(argv)

    target = resolve_target(ns.target, list(ns.overrides))
    # The flags are taken as typed (not through the KEY=VALUE parser, which reads values as YAML: `::` is a mapping
    # there) and validated by the same schema as the recipe's serve section.
    flags = {k: v for k, v in (("host", ns.host), ("port", ns.port), ("chat_template", ns.chat_template)) if v is not None}
    if flags:
        try:
            config = ServeConfig.model_validate({**target.config.model_dump(), **flags})
        except ValidationError as exc:
            problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'serve'} "
                                 f"{e.get('input')!r}: {e['msg']}" for e in exc.errors())
            raise UserError(f"finetune serve: {problems}") from None
        target = dataclasses.replace(target, config=config)
    config = target.config
    api_key = ns.api_key or os.environ.get(API_KEY_ENV) or config.api_key
    if not is_loopback(config.host) and not api_key:
        raise UserError(
            f"refusing to listen on {config.host} without an API key: anyone who can reach this machine could use "
            f"the model. Set {API_KEY_ENV}=<a long random string> (or --api-key), or bind to 127.0.0.1."
        )
    sock = listen(config.host, config.port)
    store_dir = Path(ns.store) if ns.store else target.store_dir
    try:
        serve_forever(target, api_key=api_key, store_dir=store_dir, log_level=ns.log_level, sock=sock)
    finally:
        sock.close()
    return 0


def serve_forever(target: Target, *, api_key: str | None, store_dir: Path, log_level: str = "warning",
                  sock: socket.socket | None = None) -> None:
    try:
        import uvicorn

        from serve.app import ServerSettings, create_app
    except ModuleNotFoundError as exc:
        raise UserError(f"`finetune serve` needs {exc.name}: pip install 'finetune[serve]' "
                        "(fastapi and uvicorn)") from None
    from finetune.feedback import FeedbackStore
    from serve.pool import Pool
    from serve.worker import NoChatTemplate, WorkerCrashed

    console_logging(log_level)
    config = target.config
    print(f"loading {target.gguf} ({config.workers} worker{'s' if config.workers > 1 else ''}) ...", flush=True)
    pool = Pool(worker_options(target), workers=config.workers, max_concurrent=config.max_concurrent,
                queue_timeout=config.queue_timeout_s)
    try:
        info = pool.start()
    except (NoChatTemplate, WorkerCrashed) as exc:
        pool.close()
        raise UserError(str(exc)) from None
    store = FeedbackStore(store_dir)
    settings = ServerSettings(
        model_name=target.name, api_key=api_key, max_prompt_tokens=config.prompt_limit,
        max_tokens=config.max_tokens, default_max_tokens=min(256, config.max_tokens),
        log_conversations=config.log_conversations,
        max_body_bytes=max(1 << 20, config.prompt_limit * 64),
        extra={"gguf": str(target.gguf), "n_ctx": info["n_ctx"], "chat_template": info["chat_template"]},
        allowed_hosts=local_host_names(config.host) if is_loopback(config.host) else None,
        network=not is_loopback(config.host),
    )
    app = create_app(pool, settings, store)
    url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
    print(f"serving {target.name} at {url}", flush=True)
    print(f"  web chat:       {url}/", flush=True)
    print(f"  OpenAI API:     base_url={url}/v1  model={target.name}" + ("  (Bearer key required)" if api_key else ""))
    print(f"  feedback store: {store.path}", flush=True)
    print("  stop with Ctrl-C", flush=True)
    try:
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                               access_log=log_level == "info"))
        server.run(sockets=[sock or listen(config.host, config.port)])
    finally:
        pool.close()
        store.close()
    sys.stdout.flush()
