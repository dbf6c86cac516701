"""Scale-out: the mesh and its sharding rules (mesh.py, with the TPU-torus view of fsdp in torus.py),
multi-host start-up (distributed.py), the memory estimator (memory.py), ahead-of-time TPU compiles (aot.py,
hlo_collectives.py, tpu_flags.py)."""
