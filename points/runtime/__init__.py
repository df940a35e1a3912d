"""Running the model: the attention dispatch (`attention`: SDPA or the Triton kernels, and the per-forward
`AttentionMeta`), the KV cache (`cache`), the next-token rule (`sampling`), the engine that prefills and
steps, eager or compiled (`engine`), and text generation over it (`generation`)."""
