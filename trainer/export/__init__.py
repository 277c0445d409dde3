"""What leaves training: the Hugging Face folder (weights, tokenizer, labels) and its model card."""
