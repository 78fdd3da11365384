from medlandmark.cli import main

raise SystemExit(main())
