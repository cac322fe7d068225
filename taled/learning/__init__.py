"""The learning engine: complexity, token budgets and model choice learnt from
outcomes; the similar-task memory and its embeddings."""
