from crossgrad.cli import main

raise SystemExit(main())
