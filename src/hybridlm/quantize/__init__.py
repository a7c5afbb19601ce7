"""`hybridlm quantize`: weight-only int8/int4 run directories, their quality against the source
(llama.cpp's perplexity-tool figures) and a per-layer sensitivity ranking."""
