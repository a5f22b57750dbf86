"""The workflow's stages, each what one `cifar-ensembles` subcommand does: files in, files out.

The library modules above compute; these read their inputs, call them and write outputs
atomically, so a rule stays one command.
"""
