"""HF <-> Megatron conversion: architectures, per-family key maps, shard/unshard tensor ops. No Megatron import."""
