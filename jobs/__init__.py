"""One module per Ray job; each has `main(cfg)` and runs as `python -m jobs.<verb> --config FILE`."""
