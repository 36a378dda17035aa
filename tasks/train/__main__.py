from tasks.train.stage import main

main()
