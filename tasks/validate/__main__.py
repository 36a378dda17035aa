from tasks.validate.stage import main

main()
