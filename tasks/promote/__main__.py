from tasks.promote.stage import main

main()
