"""Foreign checkpoint formats, framework-free (h5py / msgpack + NumPy).

`tf_h5` (Hugging Face `tf_model.h5`) and `flax_msgpack` (`flax_model.msgpack`) each hold the one
mapping of their format's parameter paths, a streaming reader class and a writer. The shared fast
transpose and scratch buffer are exported here.
"""

from opt_core.formats._transpose import Scratch, fast_transpose

__all__ = ["Scratch", "fast_transpose"]
