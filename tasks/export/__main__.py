from tasks.export.stage import main

main()
