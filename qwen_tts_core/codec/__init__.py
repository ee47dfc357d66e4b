"""The 12Hz speech tokenizer (codec): config, decoder (offline + exact streaming), Mimi encoder, builder, loader."""
