"""Model shapes the benchmarks use (random weights of the published models' shapes)."""
from llama2c.config import Config

SHAPES = {
    # karpathy's TinyStories models (llama2.c), MHA, vocab 32000
    "stories15M": Config(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                         vocab_size=32000, seq_len=256),
    "stories110M": Config(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                          vocab_size=32000, seq_len=1024),
    # SmolLM2-135M: GQA 9/3, tied embeddings, rope theta 100000 (context cut to 1024 here)
    "SmolLM2-135M": Config(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                           vocab_size=49152, seq_len=1024, rope_theta=100000.0),
}
