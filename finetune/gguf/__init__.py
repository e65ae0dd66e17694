"""GGUF: llama.cpp's converter (from the llama-cpp-python sdist), the runtime in a child process, parity checks."""
