"""The kernel side: the IceKNNAttention op contract, its native library and its numpy reference."""
