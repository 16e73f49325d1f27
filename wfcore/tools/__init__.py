"""The tools only the command line uses: sweeps and `wfcore analyze`."""
