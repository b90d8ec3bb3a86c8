"""``python -m arq_gym`` is the same as the ``arq-gym`` command."""

from arq_gym.cli import main

raise SystemExit(main())
