from meteor.cli import main

raise SystemExit(main())
