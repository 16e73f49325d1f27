"""Built-in wfcore plugins. Each module is an ordinary plugin, loaded through the
``wfcore`` entry-point group like any third-party package."""
