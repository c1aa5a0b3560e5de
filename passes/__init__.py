"""Graph analysis and rewrites of the mhc backend (installed as mhc_compile.passes)."""
