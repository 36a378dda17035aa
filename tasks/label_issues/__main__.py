from tasks.label_issues.stage import main

main()
