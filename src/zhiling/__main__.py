from zhiling.cli import main

raise SystemExit(main())
