"""Foreign checkpoint formats, framework-free (h5py / msgpack + NumPy)."""
