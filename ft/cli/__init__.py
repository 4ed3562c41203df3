"""cli: what the commands are built of: the config schema (`schema`), checks before any work
(`preflight`), Hydra resolvers and help (`hydra_conf`), charts (`svg`). May import every layer
below it; the commands (`ft/*.py`) sit on top and nothing in a subpackage imports them.
"""
