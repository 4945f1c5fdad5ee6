# The mutation tool is a script, not tests: keep pytest (and --doctest-modules)
# from collecting or importing anything in this directory.
collect_ignore_glob = ["*"]
