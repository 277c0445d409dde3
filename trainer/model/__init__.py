"""The network: tokenizer, model building from a folder, the Hub, GGUF or a config, adapters, and per-family facts."""
