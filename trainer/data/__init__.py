"""The data path of a worker: raw records from files or the Hub (sources, conll), the tokenized cache built once
per node (cache), and which samples each rank trains on (sampler, loaders)."""
