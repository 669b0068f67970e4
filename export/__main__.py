from .convert import main

raise SystemExit(main())
