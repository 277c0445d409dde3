"""Reading, tokenizing and batching the data: sources and formats, the cache, mixtures, streams and the global
batch sampler."""
