import sys

try:
    from crossgrad.cli import main
except KeyboardInterrupt:  # Ctrl-C at the very start: as quiet as one a moment later (see cli.main)
    print("crossgrad: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
