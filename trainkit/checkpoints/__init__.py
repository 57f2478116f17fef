"""Everything about a checkpoint, from the step directory on disk up to choosing where a run starts.

    layout     step dirs (`000040`), aliases `last`/`best`/`final` (pointer files), atomic small writes
    manifest   per-file sizes and hashes of a finished step; `verify_manifest`
    meta       `CheckpointMeta`: the typed, versioned `meta` item, its one reader and its upgrades
    manager    `CheckpointManager`: Orbax saves, retention (last N, best N, every N) and the best checkpoint
    packing    one-file `model.ckpt` (pack/unpack, checked)
    fetching   downloads into the cache: resumable, size- and hash-checked, never outside it
    sources    `resolve_source`: every way to name a checkpoint (path, alias, model.ckpt, https://, hf://, gs://)
    resume     `find_start`: this workdir, else --resume_from / --init_from, else scratch

Lower modules never import higher ones (tests/test_layout.py checks it).
"""
