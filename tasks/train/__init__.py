"""Train stage: staged fine-tuning (frozen backbone first, then unfrozen), CPU or GPU, resumable.

Modules, read top to bottom: `stage` (the stage: data in, checkpoint out), `loop` (stages, epochs,
batches), `staging` (frozen prefix / trainable suffix and the exact feature cache), `optim`
(parameter groups, optimizer, schedule), `state` (the resumable state), `augment` (dihedral
variants, crop, jitter, sampling), `runtime` (seeds, device size, distributed), `imagestore` (decoded
images on disk, per data version and size) on `rowfile` (fixed-shape rows read with pread/pwrite).
"""
