"""Translation rules, one equation → torch code, one module per kind of primitive; each module's `RULES` table
is listed in `registry.RULES` (importing this package registers nothing)."""
