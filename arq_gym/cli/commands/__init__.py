"""One module per ``arq-gym`` command; each registers itself with :func:`arq_gym.cli.command`
when imported (:func:`arq_gym.cli.build_parser` imports them all)."""
