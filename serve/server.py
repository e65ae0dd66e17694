"""``finetune serve RECIPE|MODEL.gguf``: start the local server (OpenAI-compatible API + web chat page).

With a RECIPE it serves the export stage's GGUF of ``serve.quant`` (runs/<name>/export/) and keeps conversations
and feedback in runs/<name>/serve/; with a .gguf file it serves that file and keeps them next to it. The model
lives in worker processes (finetune/gguf/worker.py); this process only speaks HTTP, so a crash in llama.cpp costs one
request, not the server.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from finetune.errors import UserError
from finetune.recipe import ServeConfig
from finetune.serve_target import Target, resolve_target, worker_options

API_KEY_ENV = "FINETUNE_API_KEY"


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


def serve(target: str, overrides: Sequence[str] = (), *, host: str | None = None, port: int | None = None,
          api_key: str | None = None, store: str | Path | None = None, chat_template: str | None = None,
          log_level: str = "warning") -> int:
    """Serve ``target`` (a recipe, with its ``overrides``, or a .gguf file) until Ctrl-C. ``host``, ``port`` and
    ``chat_template`` replace the serve section's; ``api_key`` (else FINETUNE_API_KEY, else serve.api_key) is
    required off loopback; ``store``: where conversations and feedback go instead of the target's own folder."""
    resolved = resolve_target(target, list(overrides))
    # The flags are taken as typed (not through the KEY=VALUE parser, which reads values as YAML: `::` is a mapping
    # there) and validated by the same schema as the recipe's serve section.
    flags = {k: v for k, v in (("host", host), ("port", port), ("chat_template", chat_template)) if v is not None}
    if flags:
        try:
            config = ServeConfig.model_validate({**resolved.config.model_dump(), **flags})
        except ValidationError as exc:
            problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'serve'} "
                                 f"{e.get('input')!r}: {e['msg']}" for e in exc.errors())
            raise UserError(f"finetune serve: {problems}") from None
        resolved = dataclasses.replace(resolved, config=config)
    config = resolved.config
    api_key = api_key or os.environ.get(API_KEY_ENV) or config.api_key
    if not is_loopback(config.host) and not api_key:
        raise UserError(
            f"refusing to listen on {config.host} without an API key: anyone who can reach this machine could use "
            f"the model. Set {API_KEY_ENV}=<a long random string> (or --api-key), or bind to 127.0.0.1."
        )
    sock = listen(config.host, config.port)
    store_dir = Path(store) if store else resolved.store_dir
    try:
        serve_forever(resolved, api_key=api_key, store_dir=store_dir, log_level=log_level, sock=sock)
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
    from finetune.feedback_store import FeedbackStore
    from finetune.gguf.worker import NoChatTemplate, WorkerCrashed
    from serve.pool import Pool

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
