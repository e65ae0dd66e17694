"""The local server for a fine-tuned GGUF: an OpenAI-compatible API, a web chat page and the feedback store.

    finetune serve RECIPE|MODEL.gguf      (serve/server.py: serve(), its arguments parsed in finetune/cli_parsers.py)
    serve/app.py                          HTTP endpoints (FastAPI)
    serve/pool.py                         admission (429), queueing, crash recovery
    finetune/gguf/worker.py               the child process that owns llama_cpp.Llama (shared with chat, eval)
    serve/static/index.html               the web chat page (no external resources)
"""
