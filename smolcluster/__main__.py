from smolcluster.cli import main

raise SystemExit(main())
