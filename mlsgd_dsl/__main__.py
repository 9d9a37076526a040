import sys

try:  # a Ctrl-C while the command line itself loads is one line too
    from .cli import main
except KeyboardInterrupt:
    sys.stderr.write("mlsgd-dsl: interrupted\n")
    sys.exit(130)

sys.exit(main())
