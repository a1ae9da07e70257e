"""Side-by-side measurements of zmesh against its peers; see benchmarks/README.md."""
