"""The experiment runners behind the long commands: one search (:mod:`.search`), agents x seeds
(:mod:`.benchmark`), the paper-style results table (:mod:`.table`) and the speed benchmark
(:mod:`.bench_speed`). Each writes a resumable output folder; the command line wraps them
(:mod:`arq_gym.cli.commands`)."""
